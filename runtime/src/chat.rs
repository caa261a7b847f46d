//! The chat template: the checkpoint's own (`chat_template` of
//! tokenizer_config.json, Jinja), rendered with minijinja in the Hugging
//! Face conventions (what `tokenizer.apply_chat_template` does):
//! `trim_blocks` and `lstrip_blocks`, `{% break %}` / `{% continue %}`,
//! Python string, list and dict methods (`.strip()`, `.startswith()`,
//! `.items()`, ... through minijinja-contrib's pycompat), `tojson`,
//! `raise_exception(msg)` (an error naming the template's message), and the
//! variables `messages` (a list of `{role, content}`), `add_generation_prompt`,
//! `bos_token` and `eos_token`. A checkpoint without a template gets ChatML
//! (`<|im_start|>role\ncontent<|im_end|>\n`), Ouro's format.
//!
//! A template is data from the checkpoint: rendering has a fuel limit, so a
//! template that loops without end stops with an error instead of a hang.

use minijinja::{Environment, ErrorKind, Value, context};

/// One message of a conversation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Turn {
    pub role: String,
    pub content: String,
}

impl Turn {
    pub fn new(role: &str, content: &str) -> Turn {
        Turn {
            role: role.to_string(),
            content: content.to_string(),
        }
    }
}

/// A checkpoint's chat template and the special tokens it may name.
#[derive(Clone, Debug, Default)]
pub struct ChatTemplate {
    /// The Jinja source; None: ChatML.
    pub source: Option<String>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
}

/// Steps of template evaluation allowed (a template renders a few hundred
/// to a few thousand; a loop without end is stopped here).
const FUEL: u64 = 5_000_000;

impl ChatTemplate {
    /// Render `turns`, then the assistant's prompt if `add_generation_prompt`.
    pub fn render(&self, turns: &[Turn], add_generation_prompt: bool) -> Result<String, String> {
        let Some(source) = &self.source else {
            return Ok(render_chatml(turns, add_generation_prompt));
        };
        let mut env = Environment::new();
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| format!("chat template syntax: {e}"))?;
        env.set_syntax(syntax);
        env.set_fuel(Some(FUEL));
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> Result<Value, minijinja::Error> {
            Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
        });
        let messages: Vec<Value> = turns
            .iter()
            .map(|t| context! { role => t.role.clone(), content => t.content.clone() })
            .collect();
        let ctx = context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.clone().unwrap_or_default(),
            eos_token => self.eos_token.clone().unwrap_or_default(),
        };
        env.render_str(source, ctx).map_err(|e| {
            let detail = match e.kind() {
                ErrorKind::InvalidOperation => format!("the template raised: {}", e.detail().unwrap_or("an error")),
                ErrorKind::OutOfFuel => "the template did not finish (it runs without end)".to_string(),
                _ => format!("{e:#}"),
            };
            format!("cannot render the checkpoint's chat_template: {detail}")
        })
    }

    /// `--chat`: an optional system turn and one user turn, then the
    /// assistant's prompt.
    pub fn prompt(&self, system: Option<&str>, user: &str) -> Result<String, String> {
        let mut turns = Vec::new();
        if let Some(s) = system {
            turns.push(Turn::new("system", s));
        }
        turns.push(Turn::new("user", user));
        self.render(&turns, true)
    }
}

/// ChatML: each turn as `<|im_start|>role\ncontent<|im_end|>\n`, then
/// `<|im_start|>assistant\n` if `add_generation_prompt`.
pub fn render_chatml(turns: &[Turn], add_generation_prompt: bool) -> String {
    let mut s = String::new();
    for t in turns {
        s.push_str(&format!("<|im_start|>{}\n{}<|im_end|>\n", t.role, t.content));
    }
    if add_generation_prompt {
        s.push_str("<|im_start|>assistant\n");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn template(src: &str) -> ChatTemplate {
        ChatTemplate {
            source: Some(src.into()),
            bos_token: Some("<s>".into()),
            eos_token: Some("</s>".into()),
        }
    }

    /// Ouro's (and the demo model's) template renders exactly ChatML.
    #[test]
    fn the_chatml_template_renders_as_chatml() {
        let ouro = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] \
                    + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";
        let turns = [Turn::new("system", "be brief"), Turn::new("user", "hi")];
        let t = template(ouro);
        assert_eq!(t.render(&turns, true).unwrap(), render_chatml(&turns, true));
        assert_eq!(
            t.prompt(None, "hi").unwrap(),
            "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        );
        assert_eq!(
            ChatTemplate::default().prompt(Some("be brief"), "hi").unwrap(),
            render_chatml(&turns, true)
        );
    }

    /// A Llama-2 style template: bos/eos, Python string methods, loop
    /// controls, trimmed blocks, and `raise_exception` on a bad order.
    #[test]
    fn hugging_face_conventions_hold() {
        let llama = "{% if messages[0]['role'] == 'system' %}{% set sys = messages[0]['content'].strip() %}\
                     {% set messages = messages[1:] %}{% else %}{% set sys = '' %}{% endif %}\n\
                     {% for message in messages %}\n\
                     {% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}\
                     {{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}\n\
                     {% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + (sys + ' ' if sys else '') + message['content'].upper() + ' [/INST]' }}\
                     {% else %}{{ ' ' + message['content'] + eos_token }}{% endif %}\n\
                     {% if loop.index > 3 %}{% break %}{% endif %}\n\
                     {% endfor %}";
        let t = template(llama);
        let got = t
            .render(
                &[
                    Turn::new("system", "  brief  "),
                    Turn::new("user", "hi"),
                    Turn::new("assistant", "yo"),
                ],
                false,
            )
            .unwrap();
        assert_eq!(got, "<s>[INST] brief HI [/INST] yo</s>");
        let e = t.render(&[Turn::new("assistant", "x")], false).unwrap_err();
        assert!(e.contains("roles must alternate"), "{e}");
        let json = template("{{ messages | tojson }}").render(&[Turn::new("user", "a\"b")], false);
        assert!(json.unwrap().contains("\\\"b"));
    }

    #[test]
    fn broken_and_endless_templates_are_errors() {
        let e = template("{% for m in messages %}").prompt(None, "hi").unwrap_err();
        assert!(e.contains("chat_template"), "{e}");
        let e = template("{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}")
            .prompt(None, "hi")
            .unwrap_err();
        assert!(e.contains("without end"), "{e}");
        let e = template("{{ messages[0].frobnicate() }}")
            .prompt(None, "hi")
            .unwrap_err();
        assert!(e.contains("chat_template"), "{e}");
    }
}
