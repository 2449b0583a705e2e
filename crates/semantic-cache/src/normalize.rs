//! Concept normalisation: the same request written differently should look the same before it
//! is embedded or hashed ("KPIs for B2B SaaS" = "key performance indicators for
//! business-to-business software as a service").

/// Case, punctuation and whitespace folding, contractions spelled out, and a table of
/// equivalent terms rewritten to one canonical phrase.
#[derive(Debug, Clone)]
pub struct ConceptNormalizer {
    /// (alias as tokens, canonical phrase), longest aliases first so that they win.
    aliases: Vec<(Vec<String>, String)>,
}

/// The built-in equivalences: canonical phrase, then the terms that mean it.
pub const DEFAULT_EQUIVALENCES: &[(&str, &[&str])] = &[
    ("artificial intelligence", &["ai"]),
    ("machine learning", &["ml"]),
    ("business to business", &["b2b"]),
    ("business to consumer", &["b2c"]),
    ("key performance indicator", &["kpi", "kpis", "key performance indicators"]),
    ("software as a service", &["saas"]),
    ("customer relationship management", &["crm"]),
    ("return on investment", &["roi"]),
    ("frequently asked questions", &["faq", "faqs"]),
    ("search engine optimization", &["seo", "search engine optimisation"]),
    ("user experience", &["ux"]),
    ("user interface", &["ui"]),
    ("application programming interface", &["api", "apis"]),
    ("large language model", &["llm", "llms", "large language models"]),
    // Request framing: how a request is asked, not what it asks for.
    ("create", &["generate", "make", "produce", "write", "draft", "come up with", "give me", "provide"]),
    ("", &["please", "a list of", "list of", "kindly", "can you", "could you"]),
];

impl Default for ConceptNormalizer {
    fn default() -> Self {
        Self::new(DEFAULT_EQUIVALENCES.iter().map(|(canonical, aliases)| (*canonical, aliases.iter().copied())))
    }
}

impl ConceptNormalizer {
    pub fn new<'a, A>(equivalences: impl IntoIterator<Item = (&'a str, A)>) -> Self
    where
        A: IntoIterator<Item = &'a str>,
    {
        let mut aliases = Vec::new();
        for (canonical, terms) in equivalences {
            let canonical = tokens(canonical).join(" ");
            for term in terms {
                let alias = tokens(term);
                if !alias.is_empty() && alias.join(" ") != canonical {
                    aliases.push((alias, canonical.clone()));
                }
            }
        }
        aliases.sort_by_key(|(alias, _)| std::cmp::Reverse(alias.len()));
        Self { aliases }
    }

    /// Whether `term` is one of the table's aliases or canonical phrases.
    pub fn is_concept(&self, term: &str) -> bool {
        let words = tokens(term);
        self.aliases
            .iter()
            .any(|(alias, canonical)| *alias == words || canonical.split(' ').eq(words.iter().map(String::as_str)))
    }

    pub fn normalize(&self, text: &str) -> String {
        let words = tokens(text);
        let mut out: Vec<&str> = Vec::with_capacity(words.len());
        let mut i = 0;
        'words: while i < words.len() {
            for (alias, canonical) in &self.aliases {
                if words[i..].starts_with(alias) {
                    if !canonical.is_empty() {
                        out.push(canonical);
                    }
                    i += alias.len();
                    continue 'words;
                }
            }
            out.push(&words[i]);
            i += 1;
        }
        out.join(" ")
    }
}

/// Lower-case word tokens. Contractions are spelled out (`don't` -> `do not`) so that a
/// negation is a word of its own; a possessive `'s` is dropped; decimal points and thousands
/// separators inside numbers are kept (`2.5`, `1,000` -> `1000`).
pub fn tokens(text: &str) -> Vec<String> {
    let lowered = text.to_lowercase().replace(['\u{2019}', '\u{2018}'], "'");
    let expanded = lowered
        .replace("won't", "will not")
        .replace("can't", "can not")
        .replace("n't", " not")
        .replace("'re", " are")
        .replace("'ll", " will")
        .replace("'ve", " have")
        .replace("'m", " am")
        .replace("'s", "");
    let chars: Vec<char> = expanded.chars().collect();
    let mut words = Vec::new();
    let mut word = String::new();
    for (i, &c) in chars.iter().enumerate() {
        let between_digits = |i: usize| {
            i > 0 && chars[i - 1].is_ascii_digit() && chars.get(i + 1).is_some_and(|next| next.is_ascii_digit())
        };
        if c.is_alphanumeric() || (c == '.' && between_digits(i)) {
            word.push(c);
        } else if c == ',' && between_digits(i) {
            // 1,000 is one number.
        } else if !word.is_empty() {
            words.push(std::mem::take(&mut word));
        }
    }
    if !word.is_empty() {
        words.push(word);
    }
    words
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folds_case_punctuation_and_space() {
        let n = ConceptNormalizer::default();
        assert_eq!(n.normalize("  What's   the BEST way, really?! "), "what the best way really");
        assert_eq!(n.normalize("Is 2.5 mg safe? 1,000 users"), "is 2.5 mg safe 1000 users");
        assert_eq!(n.normalize("Don't cancel"), "do not cancel");
        assert_eq!(n.normalize("I can’t log in"), "i can not log in");
    }

    #[test]
    fn equivalent_terms_meet() {
        let n = ConceptNormalizer::default();
        assert_eq!(n.normalize("AI for B2B"), n.normalize("artificial intelligence for business-to-business"));
        assert_eq!(n.normalize("KPIs for SaaS"), "key performance indicator for software as a service");
        assert_eq!(n.normalize("key performance indicators"), "key performance indicator");
        // Only whole words: "said" and "maid" hold "ai" but are not it.
        assert_eq!(n.normalize("she said the maid"), "she said the maid");
    }
}
