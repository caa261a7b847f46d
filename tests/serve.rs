//! `ouroc serve` end to end: the real binary on the demo model, on a free port. Its errors
//! through curl (when present); the official `openai` Python package through
//! tests/serve/openai_client.py (with the Python in $OUROC_PYTHON, when that Python can
//! `import openai`; skipped otherwise, saying why); the load test tests/serve/load.py at a small
//! size (concurrent clients, every answer identical to the request alone; standard library
//! Python: $OUROC_PYTHON or python3); and SIGTERM while a response streams: the response
//! completes, /health answers 503 meanwhile, the process exits 0. And an executable built by
//! `ouroc build`, with `--serve ADDR`.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A running `ouroc serve` (killed when dropped, if still running).
struct Serve {
    child: Child,
    addr: String,
    stderr: Arc<Mutex<String>>,
}

impl Serve {
    /// Starts `ouroc serve --port 0 ARGS` and waits for its start-up line.
    fn start(args: &[&str]) -> Serve {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ouroc"));
        cmd.args(["serve", "--port", "0", "--threads", "1", "--no-cache"])
            .args(args);
        Serve::spawn(cmd)
    }

    /// Starts a server (a command that prints `listening on http://ADDR` on stderr) and waits
    /// until `/health` answers.
    fn spawn(mut cmd: Command) -> Serve {
        let mut child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn the server");
        let stderr = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = mpsc::channel();
        let pipe = child.stderr.take().unwrap();
        let log = stderr.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                if let Some(rest) = line.split("listening on http://").nth(1) {
                    let addr = rest.split([',', ' ']).next().unwrap_or_default().to_string();
                    let _ = tx.send(addr);
                }
                let mut l = log.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        let addr = match rx.recv_timeout(Duration::from_secs(180)) {
            Ok(a) => a,
            Err(_) => {
                let _ = child.kill();
                panic!("the server did not start:\n{}", stderr.lock().unwrap());
            }
        };
        let s = Serve { child, addr, stderr };
        s.wait_healthy();
        s
    }

    fn wait_healthy(&self) {
        let t = Instant::now();
        loop {
            if let Ok((200, _)) = request(&self.addr, "GET", "/health", None) {
                return;
            }
            assert!(t.elapsed() < Duration::from_secs(60), "/health never answered 200");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn log(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// An HTTP/1.0 request (the answer is delimited by the connection's close, never chunked):
/// status and body.
fn request(addr: &str, method: &str, path: &str, body: Option<&str>) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(300)))?;
    send_head(&mut s, method, path, body)?;
    let mut raw = String::new();
    s.read_to_string(&mut raw)?;
    let status = raw.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = raw.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_string();
    Ok((status, body))
}

fn send_head(s: &mut TcpStream, method: &str, path: &str, body: Option<&str>) -> std::io::Result<()> {
    let body = body.unwrap_or("");
    write!(
        s,
        "{method} {path} HTTP/1.0\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

/// The Python to run `script` with: `$OUROC_PYTHON` (else python3 when `stdlib_only`), if it
/// can import `module`; Err says why not. A `$OUROC_PYTHON` that is set but cannot import
/// `module` fails the test (CI sets it: its checks must not be skipped there).
fn python(module: &str, stdlib_only: bool) -> Result<String, String> {
    let (py, asked) = match std::env::var("OUROC_PYTHON") {
        Ok(p) if !p.is_empty() => (p, true),
        _ if stdlib_only => ("python3".to_string(), false),
        _ => return Err("OUROC_PYTHON is not set".into()),
    };
    let why = match Command::new(&py).args(["-c", &format!("import {module}")]).output() {
        Ok(o) if o.status.success() => return Ok(py),
        Ok(o) => format!(
            "{py} cannot import {module}: {}",
            String::from_utf8_lossy(&o.stderr).lines().last().unwrap_or("")
        ),
        Err(e) => format!("cannot run {py}: {e}"),
    };
    assert!(!asked, "OUROC_PYTHON is set but {why}");
    Err(why)
}

fn run_script(py: &str, script: &Path, args: &[&str]) {
    let o = Command::new(py).arg(script).args(args).output().expect("run python");
    let out = String::from_utf8_lossy(&o.stdout);
    let err = String::from_utf8_lossy(&o.stderr);
    println!("{}:\n{out}{err}", script.display());
    assert!(o.status.success(), "{} failed:\n{out}\n{err}", script.display());
}

fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

#[test]
fn serve_answers_curl_the_openai_package_and_a_load_test() {
    let serve = Serve::start(&["--max-seqs", "8"]);
    let (status, body) = request(&serve.addr, "GET", "/v1/models", None).unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(json(&body)["data"][0]["id"], "demo");

    // A greedy completion is the text `ouroc run` generates (its sampling defaults turned off),
    // and the counts agree.
    let req = r#"{"prompt": "def ", "max_tokens": 12, "temperature": 0}"#;
    let (status, body) = request(&serve.addr, "POST", "/v1/completions", Some(req)).unwrap();
    assert_eq!(status, 200, "{body}");
    let v = json(&body);
    let n = v["usage"]["completion_tokens"].as_u64().unwrap();
    assert_eq!(v["ouroc"]["exit_depths"].as_array().unwrap().len() as u64, n);
    let o = Command::new(env!("CARGO_BIN_EXE_ouroc"))
        .args([
            "run",
            "--prompt",
            "def ",
            "--temperature",
            "0",
            "--repetition-penalty",
            "1",
        ])
        .args(["--max-new-tokens", "12", "--threads", "1", "--no-cache"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let printed = String::from_utf8(o.stdout).unwrap();
    assert_eq!(format!("def {}\n", v["choices"][0]["text"].as_str().unwrap()), printed);

    match Command::new("curl").arg("--version").output() {
        Ok(o) if o.status.success() => {
            for (what, args, want) in [
                (
                    "invalid JSON",
                    vec!["-X", "POST", "/v1/chat/completions", "-d", "{oops"],
                    "400",
                ),
                (
                    "unknown model",
                    vec![
                        "-X",
                        "POST",
                        "/v1/chat/completions",
                        "-d",
                        r#"{"model": "gpt-x", "messages": []}"#,
                    ],
                    "404",
                ),
                ("wrong method", vec!["-X", "DELETE", "/v1/completions"], "405"),
            ] {
                let url = format!("{}{}", serve.base_url(), args[2]);
                let mut cmd = Command::new("curl");
                cmd.args(["-s", "-w", "\n%{http_code}", "-X", args[1], &url]);
                cmd.args(&args[3..]);
                let o = cmd.output().unwrap();
                let out = String::from_utf8_lossy(&o.stdout).to_string();
                let (body, code) = out.rsplit_once('\n').unwrap();
                assert_eq!(code, want, "curl {what}: {out}");
                assert!(json(body)["error"]["message"].is_string(), "curl {what}: {body}");
            }
        }
        _ => println!("curl not found: its checks are skipped"),
    }

    match python("openai", false) {
        Ok(py) => run_script(&py, &root().join("tests/serve/openai_client.py"), &[&serve.base_url()]),
        Err(why) => println!("skipping the openai package checks: {why} (set OUROC_PYTHON to a Python with openai)"),
    }
    match python("json", true) {
        Ok(py) => run_script(
            &py,
            &root().join("tests/serve/load.py"),
            &[
                &serve.base_url(),
                "--clients",
                "16",
                "--requests",
                "32",
                "--distinct",
                "8",
                "--max-tokens",
                "6",
            ],
        ),
        Err(why) => println!("skipping the load test: {why}"),
    }
    let (status, metrics) = request(&serve.addr, "GET", "/metrics", None).unwrap();
    assert_eq!(status, 200);
    assert!(
        metrics.contains("ouroc_requests_total{endpoint=\"/v1/completions\",status=\"200\"}"),
        "{metrics}"
    );
}

#[cfg(unix)]
#[test]
fn sigterm_lets_a_streaming_response_finish_then_exits_0() {
    let mut serve = Serve::start(&["--shutdown-grace", "120"]);
    let mut stream = TcpStream::connect(&serve.addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(300))).unwrap();
    let body = r#"{"prompt": "def ", "max_tokens": 200, "temperature": 0, "stream": true}"#;
    send_head(&mut stream, "POST", "/v1/completions", Some(body)).unwrap();
    let mut reader = BufReader::new(stream);
    let mut seen = String::new();
    // Until the first token's chunk: the request is running.
    while !seen.contains("data: {") {
        let mut line = String::new();
        assert!(
            reader.read_line(&mut line).unwrap() > 0,
            "the stream ended early: {seen}"
        );
        seen.push_str(&line);
    }
    sigterm(&serve);
    // While the request runs, new requests are turned away and /health fails.
    let t = Instant::now();
    loop {
        let (status, body) = request(&serve.addr, "GET", "/health", None).unwrap();
        if status == 503 {
            assert!(json(&body)["error"]["message"].is_string(), "{body}");
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "/health still {status} after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut rest = String::new();
    reader.read_to_string(&mut rest).unwrap();
    seen.push_str(&rest);
    let events: Vec<&str> = seen.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
    assert_eq!(events.last(), Some(&"[DONE]"), "the stream completed:\n{seen}");
    let last = json(events[events.len() - 2]);
    let finish = &last["choices"][0]["finish_reason"];
    assert!(finish == "length" || finish == "stop", "{last}");
    let status = wait_exit(&mut serve);
    assert!(status.success(), "exit status {status}:\n{}", serve.log());
    assert!(serve.log().contains("shutting down"), "{}", serve.log());
}

#[cfg(unix)]
fn sigterm(serve: &Serve) {
    let pid = serve.child.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
}

/// The exit status, within 30 s.
fn wait_exit(serve: &mut Serve) -> std::process::ExitStatus {
    let t = Instant::now();
    loop {
        if let Some(s) = serve.child.try_wait().unwrap() {
            return s;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "still running after SIGTERM:\n{}",
            serve.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// An executable built by `ouroc build` serves with `--serve ADDR`: its greedy completion is
/// the text the same executable generates for the prompt on its own, and the `openai` package's
/// checks pass against it.
#[cfg(unix)]
#[test]
fn a_built_executable_serves_what_it_generates() {
    let dir = tempfile::tempdir().unwrap();
    let app = dir.path().join("demo-app");
    let demo = root().join("models/demo");
    let o = Command::new(env!("CARGO_BIN_EXE_ouroc"))
        .args(["build", demo.to_str().unwrap(), "-o", app.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "ouroc build: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let prompt = "import ";
    let o = Command::new(&app)
        .args(["--prompt", prompt, "--temperature", "0", "--repetition-penalty", "1"])
        .args(["--max-new-tokens", "10", "--threads", "1"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let printed = String::from_utf8(o.stdout).unwrap();
    let alone = printed
        .strip_prefix(prompt)
        .and_then(|t| t.strip_suffix('\n'))
        .unwrap_or_else(|| panic!("the app printed {printed:?}"));

    let mut cmd = Command::new(&app);
    cmd.args(["--serve", "127.0.0.1:0", "--threads", "1"]);
    let mut serve = Serve::spawn(cmd);
    let (status, body) = request(&serve.addr, "GET", "/v1/models", None).unwrap();
    assert_eq!(status, 200, "{body}");
    let model = json(&body)["data"][0]["id"].as_str().unwrap().to_string();
    let req = serde_json::json!({"model": model, "prompt": prompt, "max_tokens": 10, "temperature": 0});
    let (status, body) = request(&serve.addr, "POST", "/v1/completions", Some(&req.to_string())).unwrap();
    assert_eq!(status, 200, "{body}");
    let v = json(&body);
    assert_eq!(v["choices"][0]["text"], alone, "{v}");
    // The official client against the executable too.
    match python("openai", false) {
        Ok(py) => run_script(&py, &root().join("tests/serve/openai_client.py"), &[&serve.base_url()]),
        Err(why) => println!("skipping the openai package checks: {why} (set OUROC_PYTHON to a Python with openai)"),
    }
    sigterm(&serve);
    let status = wait_exit(&mut serve);
    assert!(status.success(), "exit status {status}:\n{}", serve.log());
}
