use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The kind of AI operation a call performs. Six are built in; more are declared in config
/// (`[steps.NAME]`), so this is a validated name rather than a closed enum.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct StepType(Cow<'static, str>);

/// A step name must be 1-64 characters of `a-z`, `0-9`, `_` or `-`, starting with a letter.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a step name: use 1-64 characters of a-z, 0-9, `_` or `-`, starting with a letter")]
pub struct InvalidStepName(pub String);

/// How a step talks to the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepKind {
    /// The prompt comes from the step's templates and the reply must be a JSON object valid
    /// against the step's output schema.
    #[default]
    Structured,
    /// The caller's own messages go to the model as they are (after the step's system
    /// message, if any) and the reply is free text: what an OpenAI-compatible client sends.
    Chat,
}

impl StepKind {
    pub fn label(self) -> &'static str {
        match self {
            Self::Structured => "structured",
            Self::Chat => "chat",
        }
    }
}

impl StepType {
    pub const VALIDATOR: Self = Self(Cow::Borrowed("validator"));
    pub const ENHANCER: Self = Self(Cow::Borrowed("enhancer"));
    pub const PRIORITIZER: Self = Self(Cow::Borrowed("prioritizer"));
    pub const CLASSIFIER: Self = Self(Cow::Borrowed("classifier"));
    pub const SUMMARIZER: Self = Self(Cow::Borrowed("summarizer"));
    pub const EXTRACTOR: Self = Self(Cow::Borrowed("extractor"));
    /// Free-form chat: the gateway's default step.
    pub const CHAT: Self = Self(Cow::Borrowed("chat"));

    pub const BUILT_IN: [Self; 7] = [
        Self::VALIDATOR,
        Self::ENHANCER,
        Self::PRIORITIZER,
        Self::CLASSIFIER,
        Self::SUMMARIZER,
        Self::EXTRACTOR,
        Self::CHAT,
    ];

    pub fn new(name: &str) -> Result<Self, InvalidStepName> {
        let valid = (1..=64).contains(&name.len())
            && name.starts_with(|c: char| c.is_ascii_lowercase())
            && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-');
        if !valid {
            return Err(InvalidStepName(name.to_owned()));
        }
        Ok(Self::BUILT_IN.into_iter().find(|step| step.as_str() == name).unwrap_or(Self(Cow::Owned(name.to_owned()))))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for StepType {
    type Err = InvalidStepName;
    fn from_str(name: &str) -> Result<Self, Self::Err> {
        Self::new(name)
    }
}

impl TryFrom<String> for StepType {
    type Error = InvalidStepName;
    fn try_from(name: String) -> Result<Self, Self::Error> {
        Self::new(&name)
    }
}

impl From<StepType> for String {
    fn from(step: StepType) -> Self {
        step.0.into_owned()
    }
}

impl fmt::Display for StepType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!("classifier".parse::<StepType>().unwrap(), StepType::CLASSIFIER);
        assert_eq!(StepType::new("lead-scorer_2").unwrap().as_str(), "lead-scorer_2");
        for bad in ["", "Classifier", "2fast", "a b", "x".repeat(65).as_str()] {
            assert!(StepType::new(bad).is_err(), "{bad:?}");
        }
    }
}
