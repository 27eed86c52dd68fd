//! The least-privilege grants script (`grants.sql`), filled in with validated role names.

use std::str::FromStr;

use crate::Error;

const TEMPLATE: &str = include_str!("grants.sql");

/// Rule for role names: lower-case, so they mean the same quoted or not, and short enough that
/// a policy name (`consumer_` + role) fits PostgreSQL's 63-byte identifiers.
const ROLE_RULE: &str =
    "use 1-54 characters of a-z, 0-9 and _, not starting with a digit, not pg_* or public";
/// Rule for consumer names in `--consumer ROLE=NAME,...` (they become SQL literals).
const CONSUMER_RULE: &str = "use 1-200 characters of A-Z, a-z, 0-9, _, -, . and :";

/// The roles to give Tidings privileges to; [`Grants::sql`] prints the script. Each kind of
/// role is described in the script itself (`tidings grants` prints it).
#[derive(Debug, Clone, Default)]
pub struct Grants {
    /// Roles that enqueue messages. Defaults to none.
    pub producers: Vec<String>,
    /// Roles that consume through the inbox, each with the consumer names it may use.
    /// Defaults to none.
    pub consumers: Vec<ConsumerGrant>,
    /// The role the relay runs as. Defaults to none.
    pub relay: Option<String>,
    /// The role `tidings inbox prune` runs as. Defaults to none.
    pub pruner: Option<String>,
    /// The role `tidings status`, `tidings dlq` and `tidings inbox dlq` run as. Defaults to
    /// none.
    pub operator: Option<String>,
}

/// A consumer role and the inbox consumer names it may use (`ROLE` or `ROLE=NAME,NAME`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerGrant {
    /// The database role.
    pub role: String,
    /// Consumer names (`tidings.inbox.consumer`) it may read and write; only these.
    pub names: Vec<String>,
}

impl FromStr for ConsumerGrant {
    type Err = Error;

    /// `ROLE` (the consumer name is the role name) or `ROLE=NAME[,NAME...]`.
    fn from_str(s: &str) -> Result<Self, Error> {
        let (role, names) = match s.split_once('=') {
            Some((role, names)) => (role, names.split(',').map(str::to_owned).collect()),
            None => (s, vec![s.to_owned()]),
        };
        let grant = ConsumerGrant {
            role: check_role(role)?.to_owned(),
            names,
        };
        for n in &grant.names {
            check_consumer(n)?;
        }
        Ok(grant)
    }
}

/// Checks a role name against the strict rule the script relies on; returns it unchanged.
pub fn check_role(name: &str) -> Result<&str, Error> {
    let ok = (1..=54).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && !name.starts_with("pg_")
        && name != "public"
        && name != "none";
    if ok {
        Ok(name)
    } else {
        Err(Error::InvalidName {
            what: "role name",
            name: name.to_owned(),
            rule: ROLE_RULE,
        })
    }
}

fn check_consumer(name: &str) -> Result<&str, Error> {
    let ok = (1..=200).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-.:".contains(&b));
    if ok {
        Ok(name)
    } else {
        Err(Error::InvalidName {
            what: "consumer name",
            name: name.to_owned(),
            rule: CONSUMER_RULE,
        })
    }
}

/// The template's sections by name.
fn section(name: &str) -> &'static str {
    let marker = format!("--- section: {name}\n");
    let start = TEMPLATE
        .find(&marker)
        .map(|i| i + marker.len())
        // The template is a file of this crate and names every section this module asks for.
        .unwrap_or_else(|| panic!("grants.sql has no section {name}"));
    let end = TEMPLATE[start..]
        .find("--- section: ")
        .map_or(TEMPLATE.len(), |i| start + i);
    &TEMPLATE[start..end]
}

/// The template's header comment.
fn header() -> &'static str {
    let end = TEMPLATE.find("--- section: ").unwrap_or(0);
    &TEMPLATE[..end]
}

/// One section for one (checked) role.
fn fill(out: &mut String, name: &str, role: &str, consumers: &[String]) {
    let list = consumers
        .iter()
        .map(|c| format!("'{c}'"))
        .collect::<Vec<_>>()
        .join(", ");
    out.push_str(
        &section(name)
            .replace("{role}", &format!("\"{role}\""))
            .replace("{name}", role)
            .replace("{consumers}", &list),
    );
}

impl Grants {
    /// The script: checks every name first (nothing is printed for a bad one), then fills the
    /// template. Idempotent; run it as the schema owner after every `tidings migrate up`.
    pub fn sql(&self) -> Result<String, Error> {
        let named = self
            .producers
            .iter()
            .chain(self.consumers.iter().map(|c| &c.role))
            .chain(
                [&self.relay, &self.pruner, &self.operator]
                    .into_iter()
                    .flatten(),
            );
        let mut roles: Vec<&str> = Vec::new();
        for r in named {
            let r = check_role(r)?;
            if !roles.contains(&r) {
                roles.push(r);
            }
        }
        // A role named twice with --consumer may use the names of both.
        let mut consumers: Vec<ConsumerGrant> = Vec::new();
        for c in &self.consumers {
            if c.names.is_empty() {
                check_consumer("")?;
            }
            let i = match consumers.iter().position(|x| x.role == c.role) {
                Some(i) => i,
                None => {
                    consumers.push(ConsumerGrant {
                        role: c.role.clone(),
                        names: Vec::new(),
                    });
                    consumers.len() - 1
                }
            };
            for n in &c.names {
                check_consumer(n)?;
                if !consumers[i].names.contains(n) {
                    consumers[i].names.push(n.clone());
                }
            }
        }

        // The pruner's policy admits every consumer's rows: a consumer role that is also the
        // pruner would read and delete other consumers' records through it.
        if let Some(p) = &self.pruner {
            if consumers.iter().any(|c| &c.role == p) {
                return Err(Error::InvalidName {
                    what: "role name",
                    name: p.clone(),
                    rule: "a role cannot be both a consumer and the pruner (the pruner sees every consumer's rows); use two roles",
                });
            }
        }
        // Likewise the operator's policy on the parked messages: a consumer role that is also
        // the operator would park, rewrite and delete other consumers' messages through it.
        if let Some(o) = &self.operator {
            if consumers.iter().any(|c| &c.role == o) {
                return Err(Error::InvalidName {
                    what: "role name",
                    name: o.clone(),
                    rule: "a role cannot be both a consumer and the operator (the operator sees every consumer's parked messages); use two roles",
                });
            }
        }
        let mut out = String::from(header());
        out.push_str(section("begin"));
        for r in &roles {
            fill(&mut out, "reset", r, &[]);
        }
        let mut producers: Vec<&str> = Vec::new();
        for p in &self.producers {
            if !producers.contains(&p.as_str()) {
                producers.push(p);
                fill(&mut out, "producer", p, &[]);
            }
        }
        for c in &consumers {
            fill(&mut out, "consumer", &c.role, &c.names);
        }
        if let Some(r) = &self.relay {
            fill(&mut out, "relay", r, &[]);
        }
        if let Some(r) = &self.pruner {
            fill(&mut out, "pruner", r, &[]);
        }
        if let Some(r) = &self.operator {
            fill(&mut out, "operator", r, &[]);
        }
        out.push_str(section("commit"));
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_could_carry_sql_are_refused() {
        for bad in [
            "",
            "App",
            "a;drop table x",
            "a\"b",
            "1app",
            "pg_monitor",
            "public",
            "a b",
            &"a".repeat(55),
        ] {
            assert!(check_role(bad).is_err(), "{bad:?} accepted");
            let g = Grants {
                relay: Some(bad.to_owned()),
                ..Default::default()
            };
            assert!(g.sql().is_err(), "{bad:?} printed");
        }
        assert!("svc=a'b".parse::<ConsumerGrant>().is_err());
        assert!("svc=a,".parse::<ConsumerGrant>().is_err());
        assert!("Svc=a".parse::<ConsumerGrant>().is_err());
    }

    #[test]
    fn consumer_names_default_to_the_role_and_merge() {
        let c: ConsumerGrant = "card_service".parse().unwrap();
        assert_eq!(c.names, ["card_service"]);
        let g = Grants {
            producers: vec!["app".into()],
            consumers: vec![
                "card_service=card,card-refunds".parse().unwrap(),
                "card_service=card.audit".parse().unwrap(),
            ],
            relay: Some("tidings_relay".into()),
            pruner: Some("card_pruner".into()),
            operator: Some("ops".into()),
        };
        let sql = g.sql().unwrap();
        assert!(sql.contains("USING (consumer IN ('card', 'card-refunds', 'card.audit'))"));
        assert!(sql.contains(
            "CREATE POLICY \"consumer_card_service\" ON tidings.inbox TO \"card_service\""
        ));
        assert!(sql.contains("CREATE POLICY \"pruner_card_pruner\""));
        let both = Grants {
            pruner: Some("card_service".into()),
            ..g.clone()
        };
        assert!(both
            .sql()
            .unwrap_err()
            .to_string()
            .contains("both a consumer and the pruner"));
        let both = Grants {
            operator: Some("card_service".into()),
            ..g.clone()
        };
        assert!(both
            .sql()
            .unwrap_err()
            .to_string()
            .contains("both a consumer and the operator"));
        assert!(
            sql.contains("CREATE POLICY \"operator_ops\" ON tidings.inbox_dead_letters TO \"ops\"")
        );
        assert_eq!(
            sql.matches("DROP POLICY IF EXISTS \"operator_").count(),
            5,
            "every role named loses an operator policy it had"
        );
        assert_eq!(sql.matches("REVOKE ALL ON ALL TABLES").count(), 5);
        assert!(
            !sql[header().len()..].contains('{'),
            "placeholder left: {sql}"
        );
        assert!(sql.trim_end().ends_with("COMMIT;"));
    }
}
