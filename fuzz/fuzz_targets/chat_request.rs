//! The gateway's request parser: OpenAI's chat completion body, and its translation into a
//! chat step's and a structured step's input.
#![no_main]

use aipipe::openai::CompletionRequest;
use libfuzzer_sys::fuzz_target;
use pipeline_core::StepType;

fuzz_target!(|data: &[u8]| {
    if let Ok(request) = serde_json::from_slice::<CompletionRequest>(data) {
        let _ = request.unsupported_field();
        let _ = request.chat_input();
        let _ = request.structured_input(&StepType::CLASSIFIER);
    }
});
