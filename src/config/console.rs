//! `[console]`: the web console's listener and who may use it (`redrive console`).
//!
//! With no `[[console.users]]` the console serves only a loopback address, to the operating-system
//! user who started it. Anywhere else it refuses to start unless users are configured: each signs
//! in with a password (HTTP basic authentication) or a bearer token, and has a role.

use super::{invalid, sources, ConfigError, PostgresConfig};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::Path;

/// `[console]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConsoleConfig {
    /// Where the console listens. Loopback by default; any other address needs users.
    pub listen: SocketAddr,
    /// Who may sign in. Empty: no sign-in, loopback only.
    pub users: Vec<ConsoleUser>,
    /// Rows per page of the browse page.
    pub page_size: u32,
    /// Rows per transaction of a bulk action, as the CLI's `--chunk-size`.
    pub chunk_size: u64,
}

impl Default for ConsoleConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8089)),
            users: Vec::new(),
            page_size: 50,
            chunk_size: 1000,
        }
    }
}

/// `[[console.users]]`: one person or program that may use the console.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsoleUser {
    /// Recorded in the audit columns (`last_replayed_by`, `paused_by`) of what they change.
    pub name: String,
    /// `read-only` (overview, browse, detail) or `operator` (also replay, purge, pause, resume,
    /// retry now).
    pub role: Role,
    /// For HTTP basic authentication (a browser asks for it).
    pub password: Option<SecretString>,
    /// For `Authorization: Bearer <token>`.
    pub token: Option<SecretString>,
}

/// What a console user may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// See everything, change nothing.
    ReadOnly,
    /// See everything, and act.
    Operator,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::ReadOnly => "read-only",
            Role::Operator => "operator",
        }
    }
}

/// What `redrive console` reads: `[postgres]` and `[console]`.
#[derive(Debug, Clone)]
pub struct ConsoleSettings {
    pub postgres: PostgresConfig,
    pub console: ConsoleConfig,
}

impl ConsoleSettings {
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let figment = sources(path)?;
        let postgres = PostgresConfig::load(path)?;
        let console: ConsoleConfig = if figment.contains("console") {
            figment
                .extract_inner("console")
                .map_err(|e| ConfigError::Parse(Box::new(e)))?
        } else {
            ConsoleConfig::default()
        };
        console.validate()?;
        Ok(Self { postgres, console })
    }
}

impl ConsoleConfig {
    /// Parses a `[console]` table's TOML (tests).
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        use figment::providers::{Format, Toml};
        let console: Self = figment::Figment::from(Toml::string(text))
            .extract()
            .map_err(|e| ConfigError::Parse(Box::new(e)))?;
        console.validate()?;
        Ok(console)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.users.is_empty() && !self.listen.ip().is_loopback() {
            return Err(invalid(
                "console.listen",
                format!(
                    "is {}, which is not a loopback address: the console can replay and purge \
                     production messages, so it serves other addresses only with sign-in. \
                     Add [[console.users]] with a password or a token, or listen on 127.0.0.1",
                    self.listen
                ),
            ));
        }
        if self.page_size == 0 || self.page_size > 1000 {
            return Err(invalid("console.page_size", "must be between 1 and 1000"));
        }
        if self.chunk_size == 0 || self.chunk_size > 100_000 {
            return Err(invalid(
                "console.chunk_size",
                "must be between 1 and 100000",
            ));
        }
        let mut names = HashSet::new();
        for (i, u) in self.users.iter().enumerate() {
            let field = |f: &str| format!("console.users[{i}].{f}");
            if u.name.trim().is_empty()
                || u.name.contains(':')
                || u.name.chars().any(char::is_control)
            {
                return Err(invalid(
                    field("name"),
                    "must be non-empty, without ':' or control characters",
                ));
            }
            if !names.insert(u.name.as_str()) {
                return Err(invalid(
                    field("name"),
                    format!("`{}` is named twice", u.name),
                ));
            }
            if u.password.is_none() && u.token.is_none() {
                return Err(invalid(
                    field("password"),
                    format!("or `token` is needed: `{}` could not sign in", u.name),
                ));
            }
            for (f, secret) in [("password", &u.password), ("token", &u.token)] {
                if secret
                    .as_ref()
                    .is_some_and(|s| s.expose_secret().len() < 12)
                {
                    return Err(invalid(field(f), "must be at least 12 characters"));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problem(text: &str) -> String {
        ConsoleConfig::from_toml(text).unwrap_err().to_string()
    }

    #[test]
    fn defaults_listen_on_loopback_without_sign_in() {
        let c = ConsoleConfig::from_toml("").unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:8089");
        assert!(c.users.is_empty());
    }

    #[test]
    fn another_address_needs_users_and_users_need_a_secret_of_their_own() {
        assert!(problem("listen = \"0.0.0.0:8089\"")
            .contains("`console.listen` is 0.0.0.0:8089, which is not a loopback address"));
        let user = |extra: &str| {
            format!("listen = \"0.0.0.0:8089\"\n[[users]]\nname = \"ann\"\nrole = \"operator\"\n{extra}")
        };
        assert!(ConsoleConfig::from_toml(&user("password = \"twelve chars\"")).is_ok());
        assert!(problem(&user("")).contains("`console.users[0].password` or `token` is needed"));
        assert!(problem(&user("token = \"short\""))
            .contains("`console.users[0].token` must be at least 12 characters"));
        assert!(problem(&user("password = \"twelve chars\"\nrole2 = 1")).contains("role2"));
        let twice = format!(
            "{}\n[[users]]\nname = \"ann\"\nrole = \"read-only\"\ntoken = \"a-long-enough-token\"",
            user("password = \"twelve chars\"")
        );
        assert!(problem(&twice).contains("`console.users[1].name` `ann` is named twice"));
        assert!(problem(
            "[[users]]\nname = \"a\"\nrole = \"admin\"\ntoken = \"a-long-enough-token\""
        )
        .contains("unknown variant: found `admin`"));
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment's Jail fixes the closure's error type
    fn users_can_come_from_the_environment() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("c.toml", "[postgres]\nurl = \"postgres://u@h/db\"\n")?;
            jail.set_env(
                "REDRIVE_CONSOLE__USERS",
                r#"[{name="ann", role="operator", token="from-the-environment"}]"#,
            );
            jail.set_env("REDRIVE_CONSOLE__LISTEN", "0.0.0.0:9000");
            let s = ConsoleSettings::load(Some(Path::new("c.toml"))).map_err(|e| e.to_string())?;
            assert_eq!(s.console.listen.to_string(), "0.0.0.0:9000");
            assert_eq!(s.console.users[0].name, "ann");
            assert_eq!(
                s.console.users[0].token.as_ref().unwrap().expose_secret(),
                "from-the-environment"
            );
            Ok(())
        });
    }
}
