//! The chat template. Ouro's tokenizer_config.json holds a ChatML Jinja
//! template; rather than embed a Jinja engine, ouroc recognises ChatML and
//! renders it directly, and refuses other templates by name.

/// Render a single user turn plus the assistant prompt in ChatML:
/// `<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n`, after
/// an optional system turn.
pub fn render_chatml(system: Option<&str>, prompt: &str) -> String {
    let mut s = String::new();
    if let Some(sys) = system {
        s.push_str(&format!("<|im_start|>system\n{sys}<|im_end|>\n"));
    }
    s.push_str(&format!(
        "<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
    ));
    s
}

/// Check that a checkpoint's template is ChatML (the only kind supported).
pub fn check_template(template: Option<&str>) -> Result<(), String> {
    match template {
        None => Err("the checkpoint's tokenizer_config.json has no chat_template; run without --chat".into()),
        Some(t) if t.contains("<|im_start|>") && t.contains("<|im_end|>") => Ok(()),
        Some(_) => Err(
            "the checkpoint's chat_template is not ChatML (<|im_start|>/<|im_end|>), \
             the only template ouroc renders; run without --chat"
                .into(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chatml_turns() {
        assert_eq!(
            render_chatml(None, "hi"),
            "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        );
        assert!(render_chatml(Some("be brief"), "hi").starts_with("<|im_start|>system\nbe brief<|im_end|>\n"));
    }

    #[test]
    fn non_chatml_templates_are_refused() {
        assert!(
            check_template(Some("{{ bos }}[INST]"))
                .unwrap_err()
                .contains("not ChatML")
        );
        assert!(check_template(None).unwrap_err().contains("no chat_template"));
        assert!(check_template(Some("<|im_start|>{{m}}<|im_end|>")).is_ok());
    }
}
