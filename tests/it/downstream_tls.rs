//! Downstream `tls` (a private CA, mutual TLS), outbound `basic` auth and
//! OAuth2 `params` (SPEC §8), with the real binary against a local HTTPS CRM
//! whose certificate a throwaway CA signed and which requires a client
//! certificate from that CA. `validate` checks the files at load.

use std::sync::{Arc, Mutex};

use axum::extract::Request;
use base64::Engine as _;

use crate::support::process::serve;
use crate::support::tls::{PeerCert, TestCa, common_name, https_server};
use crate::support::{self, gateway_cmd};

/// What the CRM saw of one request.
#[derive(Debug, Clone)]
struct Seen {
    path: String,
    authorization: Option<String>,
    /// The common name of the client certificate the connection presented.
    client_cn: Option<String>,
    body: String,
}

async fn crm(ca: &TestCa) -> (std::net::SocketAddr, Arc<Mutex<Vec<Seen>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    let router = axum::Router::new().fallback(move |req: Request| {
        let s = s.clone();
        async move {
            let peer = req.extensions().get::<PeerCert>().cloned();
            let path = req.uri().path().to_owned();
            let authorization = req
                .headers()
                .get("authorization")
                .map(|v| v.to_str().unwrap().to_owned());
            let body = axum::body::to_bytes(req.into_body(), 1 << 20)
                .await
                .unwrap();
            s.lock().unwrap().push(Seen {
                path: path.clone(),
                authorization,
                client_cn: peer.and_then(|p| p.0).and_then(|d| common_name(&d)),
                body: String::from_utf8_lossy(&body).into_owned(),
            });
            if path == "/token" {
                r#"{"access_token":"tok-over-mtls","token_type":"Bearer","expires_in":3600}"#
            } else {
                r#"{"ok":true}"#
            }
        }
    });
    let server = ca.server(&["localhost", "127.0.0.1"], "crm.internal");
    let addr = https_server(router, &server, Some(&ca.cert)).await;
    (addr, seen)
}

fn routes(port: u16) -> String {
    format!(
        r#"bots:
  - id: b
    auth: {{ api_key: {{ keys: ["k"] }} }}
defaults:
  retry: {{ attempts: 1 }}
routes:
  - name: basic-over-mtls
    bot: b
    intent: basic
    downstream:
      url: "https://localhost:{port}/contacts"
      tls:
        ca_file: ../tls/ca.crt
        client_cert_file: ../tls/client.crt
        client_key_file: ../tls/client.key
      auth: {{ basic: {{ username: gateway, password: "${{CRM_PASSWORD}}" }} }}
  - name: oauth-over-mtls
    bot: b
    intent: oauth
    downstream:
      url: "https://localhost:{port}/contacts"
      tls:
        ca_file: ../tls/ca.crt
        client_cert_file: ../tls/client.crt
        client_key_file: ../tls/client.key
      auth:
        oauth2:
          token_url: "https://localhost:{port}/token"
          client_id: gateway
          client_secret: "${{CRM_CLIENT_SECRET}}"
          client_auth: body
          params: {{ audience: "https://crm.internal/api", resource: "api://crm" }}
  - name: system-roots-only
    bot: b
    intent: no_ca
    downstream:
      url: "https://localhost:{port}/contacts"
  - name: ca-without-client-cert
    bot: b
    intent: no_cert
    downstream:
      url: "https://localhost:{port}/contacts"
      tls: {{ ca_file: ../tls/ca.crt }}
"#
    )
}

async fn post(client: &reqwest::Client, listen: &str, intent: &str) -> (u16, String) {
    let r = client
        .post(format!("http://{listen}/webhooks/b"))
        .header("x-api-key", "k")
        .body(format!(r#"{{"sessionId":"s","intent":"{intent}"}}"#))
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_ca_and_a_client_certificate_reach_an_mtls_crm() {
    let ca = TestCa::new("private test CA");
    let (addr, seen) = crm(&ca).await;
    let tmp = tempfile::tempdir().unwrap();
    let (routes_dir, tls) = (tmp.path().join("routes"), tmp.path().join("tls"));
    std::fs::create_dir_all(&routes_dir).unwrap();
    std::fs::create_dir_all(&tls).unwrap();
    std::fs::write(tls.join("ca.crt"), &ca.cert).unwrap();
    ca.client("gateway-client").write(&tls, "client");
    std::fs::write(routes_dir.join("crm.yaml"), routes(addr.port())).unwrap();
    let store = format!("sqlite://{}", tmp.path().join("gw.db").display());
    let env = [
        ("CRM_PASSWORD", "p@ss:word"),
        ("CRM_CLIENT_SECRET", "oauth-secret"),
    ];
    let gw = serve(&routes_dir, &store, &[], &env);
    let client = support::client();

    // basic auth over mutual TLS
    let (status, body) = post(&client, &gw.listen, "basic").await;
    assert_eq!(status, 200, "{body}");
    let s = seen.lock().unwrap().last().cloned().unwrap();
    assert_eq!(s.path, "/contacts");
    assert_eq!(s.client_cn.as_deref(), Some("gateway-client"));
    let want = base64::engine::general_purpose::STANDARD.encode("gateway:p@ss:word");
    assert_eq!(s.authorization, Some(format!("Basic {want}")));

    // OAuth2: the token request goes over the route's TLS too, with the params
    let (status, body) = post(&client, &gw.listen, "oauth").await;
    assert_eq!(status, 200, "{body}");
    let all = seen.lock().unwrap().clone();
    let token = all
        .iter()
        .find(|s| s.path == "/token")
        .expect("a token request");
    assert_eq!(token.client_cn.as_deref(), Some("gateway-client"));
    let form: Vec<(String, String)> = url::form_urlencoded::parse(token.body.as_bytes())
        .into_owned()
        .collect();
    for (k, v) in [
        ("grant_type", "client_credentials"),
        ("audience", "https://crm.internal/api"),
        ("resource", "api://crm"),
        ("client_id", "gateway"),
    ] {
        assert!(
            form.contains(&(k.to_owned(), v.to_owned())),
            "{k}={v} in {form:?}"
        );
    }
    let last = all.last().unwrap();
    assert_eq!(last.path, "/contacts");
    assert_eq!(last.authorization.as_deref(), Some("Bearer tok-over-mtls"));

    // Without the private CA the CRM's certificate is not trusted; without a
    // client certificate the CRM refuses the handshake: nothing gets through.
    let before = seen.lock().unwrap().len();
    for intent in ["no_ca", "no_cert"] {
        let (status, body) = post(&client, &gw.listen, intent).await;
        assert_eq!(status, 502, "{intent}: {body}");
    }
    assert_eq!(seen.lock().unwrap().len(), before);

    let (status, lines) = gw.stop("-TERM").await;
    assert!(status.success());
    let log = lines.join("\n");
    for secret in ["p@ss:word", "oauth-secret", "tok-over-mtls", "PRIVATE KEY"] {
        assert!(!log.contains(secret), "{secret} in the log");
    }
}

/// `gateway validate` on `routes` (in a temp dir beside `tls/`): exit code and stdout.
fn validate(dir: &std::path::Path) -> (i32, String) {
    let out = gateway_cmd()
        .current_dir(dir)
        .args(["validate", "routes"])
        .output()
        .unwrap();
    (
        out.status.code().unwrap(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn unreadable_or_mismatched_tls_files_are_validate_errors() {
    let ca = TestCa::new("private test CA");
    let other = TestCa::new("another CA");
    let tmp = tempfile::tempdir().unwrap();
    let (routes_dir, tls) = (tmp.path().join("routes"), tmp.path().join("tls"));
    std::fs::create_dir_all(&routes_dir).unwrap();
    std::fs::create_dir_all(&tls).unwrap();
    std::fs::write(tls.join("ca.crt"), &ca.cert).unwrap();
    let (cert, _) = ca.client("gateway-client").write(&tls, "client");
    let (_, other_key) = other.client("someone-else").write(&tls, "other");
    let _ = (cert, other_key);
    let route = |name: &str, intent: &str, tls: &str| {
        format!(
            "  - name: {name}\n    bot: b\n    intent: {intent}\n    downstream:\n      url: \"https://crm.example.com/x\"\n      tls: {tls}\n"
        )
    };
    let file = [
        "bots:\n  - id: b\n    auth: { none: {} }\nroutes:\n".to_string(),
        route(
            "mismatched",
            "a",
            "{ ca_file: ../tls/ca.crt, client_cert_file: ../tls/client.crt, client_key_file: ../tls/other.key }",
        ),
        route("unreadable", "b", "{ ca_file: ../tls/missing.crt }"),
        route("key-as-ca", "c", "{ ca_file: ../tls/client.key }"),
        route("cert-alone", "d", "{ client_cert_file: ../tls/client.crt }"),
        route("env-unset", "e", "{ ca_file: \"${CRM_CA_FILE}\" }"),
        route(
            "fine",
            "f",
            "{ ca_file: ../tls/ca.crt, client_cert_file: ../tls/client.crt, client_key_file: ../tls/client.key }",
        ),
    ]
    .concat();
    std::fs::write(routes_dir.join("crm.yaml"), file).unwrap();
    let (code, out) = validate(tmp.path());
    println!("{out}");
    assert_eq!(code, 1, "{out}");
    for want in [
        "routes[0].downstream.tls.client_key_file: the key in `",
        "does not belong to the certificate in `",
        "routes[1].downstream.tls.ca_file: cannot read `",
        "routes[2].downstream.tls.ca_file: `",
        "holds no certificate (PEM `BEGIN CERTIFICATE`)",
        "routes[3].downstream.tls: `client_cert_file` needs `client_key_file`",
        "warning: routes[4].downstream.tls.ca_file: environment variable `CRM_CA_FILE` not set",
        "4 errors, ",
    ] {
        assert!(out.contains(want), "`{want}` not in:\n{out}");
    }
    assert!(
        !out.contains("routes[5].downstream"),
        "the good block is fine:\n{out}"
    );
    assert!(
        !out.contains("BEGIN PRIVATE KEY-----\n"),
        "no key material:\n{out}"
    );
}
