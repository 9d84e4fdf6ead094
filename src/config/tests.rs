//! Tests of loading and validating config files.
use super::problems::thousands;
use super::sql::{read_only_query, sql_tokens, SqlKind, RESERVED_WORDS};
use super::*;

fn check(text: &str) -> Result<Config, Vec<Problem>> {
    parse(Path::new("/etc/tailgate/streams.toml"), text).map_err(|e| e.problems().to_vec())
}

#[test]
fn minimal_config_gets_defaults() {
    let c = check("[[streams]]\npath = \"/a\"\nview = \"v\"\n").expect("valid");
    assert_eq!(c.upstream.target, UpstreamTarget::Embedded);
    assert_eq!(c.server.listen.port(), 8000);
    let s = &c.streams[0];
    assert_eq!(s.event, "update");
    assert_eq!(s.retry, Duration::from_secs(15));
    assert_eq!(s.delay, Duration::ZERO);
    assert_eq!(s.source, Source::View("v".into()));
}

#[test]
fn defaults_apply_and_streams_override() {
    let c = check(
        "[defaults]\ndelay = \"1s\"\nevent = \"msg\"\n\
         [[streams]]\npath = \"/a\"\nquery = \"SELECT 1;\"\n\
         [[streams]]\npath = \"/b\"\nview = \"s.v\"\ndelay = \"250ms\"\nevent = \"x\"\nkey = [\"id\"]\n",
    )
    .expect("valid");
    assert_eq!(c.streams[0].delay, Duration::from_secs(1));
    assert_eq!(c.streams[0].event, "msg");
    assert_eq!(c.streams[0].source, Source::Query("SELECT 1".into()));
    assert_eq!(c.streams[1].delay, Duration::from_millis(250));
    assert_eq!(c.streams[1].key, Some(vec!["id".to_string()]));
}

#[test]
fn all_problems_are_reported_together_with_positions() {
    let text = "[server]\nlisten = \"127.0.0.1:8000\"\n\
                [[streams]]\npath = \"/a\"\nview = \"v\"\ncolour = \"red\"\n\
                [[streams]]\npath = \"/b\"\nview = \"v\"\nquery = \"SELECT 1\"\n\
                [[streams]]\npath = \"/b\"\nview = \"w\"\n\
                [[streams]]\npath = \"/c\"\nview = \"w\"\ndelay = \"soon\"\n\
                [[streams]]\npath = \"/d\"\n";
    let problems = check(text).expect_err("invalid");
    let messages: Vec<String> = problems
        .iter()
        .map(|p| format!("{}:{} {}", p.line, p.column, p.message))
        .collect();
    assert_eq!(problems.len(), 5, "{messages:#?}");
    assert!(messages[0].starts_with("6:1 ") && messages[0].contains("colour"));
    assert!(messages[1].starts_with("9:8 ") && messages[1].contains("both"));
    assert!(messages[2].starts_with("12:8 ") && messages[2].contains("duplicate"));
    assert!(messages[3].starts_with("17:9 ") && messages[3].contains("bad duration"));
    assert!(messages[4].starts_with("19:8 ") && messages[4].contains("neither"));
}

#[test]
fn every_problem_of_one_entry_is_reported() {
    let text = "[[streams]]\npath = \"/a\"\nview = \"v\"\n\
                [[streams]]\npath = \"/a\"\nview = \"v\"\nquery = \"SELECT 1\"\n\
                colour = \"red\"\ndelay = \"soon\"\n\
                [[streams]]\npath = 5\nview = \"v\"\nretry = 5\n\
                [server]\nheartbeat = \"often\"\nshade = 1\n";
    let problems = check(text).expect_err("invalid");
    let messages: Vec<String> = problems
        .iter()
        .map(|p| format!("{}:{} {}", p.line, p.column, p.message))
        .collect();
    for (needle, line) in [
        ("duplicate", 5),
        ("both", 6),
        ("colour", 8),
        ("bad duration", 9),
        ("`path`: invalid type", 11),
        ("`retry`: invalid type", 13),
        ("\"often\"", 15),
        ("shade", 16),
    ] {
        assert!(
            messages
                .iter()
                .any(|m| m.contains(needle) && m.starts_with(&format!("{line}:"))),
            "{needle} on line {line}: {messages:#?}"
        );
    }
    // Each once; nothing invented for the unreadable entry (no missing `path`).
    assert_eq!(messages.len(), 8, "{messages:#?}");
}

/// Whether `sql` holds a `;` outside literals, quoted identifiers and comments.
fn separates_statements(sql: &str) -> bool {
    sql_tokens(sql).any(|t| t.kind == SqlKind::Semicolon)
}

#[test]
fn only_a_real_semicolon_separates_statements() {
    for sql in [
        "SELECT * FROM t WHERE note <> 'a;b'",
        "SELECT 'it''s; fine' AS \"a;b\" FROM t",
        "SELECT 1 -- one; two\n",
        "SELECT /* ; */ 1",
        "SELECT $$;$$, $x$ a;b $x$, $1",
        "SELECT 1 -- trailing comment",
        "SELECT E'it\\'s; ok' FROM t",
        "SELECT 'a\\', 'b' FROM t",
    ] {
        assert!(!separates_statements(sql), "{sql}");
    }
    for sql in [
        "SELECT 1; DROP TABLE t",
        "SELECT 'a'; SELECT 2",
        "SELECT 1 /* c */; SELECT 2",
        "SELECT $$x$$; SELECT 2",
        "SELECT a$b$ FROM t; DROP TABLE t",
        "SELECT $1$; DROP TABLE t",
        "SELECT E'\\''; DROP TABLE t; SELECT ''",
        "SELECT 'x'; SELECT é$$",
        "SELECT 1 --c\r; DROP TABLE t",
    ] {
        assert!(separates_statements(sql), "{sql}");
    }
}

#[test]
fn read_only_queries_pass() {
    for sql in [
        "SELECT 1",
        "select * from t",
        "(SELECT 1) UNION (SELECT 2)",
        "((VALUES (1), (2)))",
        "TABLE t",
        "SHOW clusters",
        "/* c */ -- c\n SELECT 1",
        "/* a /* nested */ DELETE */ SELECT 1",
        "WITH a AS (SELECT 1) SELECT * FROM a",
        "WITH RECURSIVE r(n) AS (VALUES (1) UNION ALL SELECT n + 1 FROM r WHERE n < 5) SELECT * FROM r",
        "WITH MUTUALLY RECURSIVE (RETURN AT RECURSION LIMIT 10) a (x int) AS (SELECT 1), b (y int) AS (SELECT x FROM a) SELECT * FROM b",
        "WITH a AS MATERIALIZED (SELECT 1), b AS NOT MATERIALIZED (TABLE a) (VALUES (1))",
        "WITH \"q\" AS ((WITH r AS (SELECT 1) TABLE r)) TABLE \"q\"",
        "WITH recursive AS (SELECT 1) SELECT * FROM recursive",
        "SELECT \"delete\" FROM t",
        "SELECT update_count FROM t",
        "SELECT 'DELETE' AS x, $$INSERT$$, $t$ ; $t$, E'\\' DELETE', \"into\"",
        "SELECT delete FROM t",
        "SELECT * FROM (WITH a AS (SELECT 1) SELECT * FROM a) s WHERE x IN (VALUES (1))",
        "SELECT $1, x FROM t -- DELETE\r\nWHERE y",
        "SELECT ts FROM t WITH ORDINALITY",
    ] {
        assert_eq!(read_only_query(sql), Ok(()), "{sql}");
    }
}

#[test]
fn writes_and_other_statements_are_refused_where_they_start() {
    for (sql, at) in [
        ("DELETE FROM items", "DELETE"),
        ("  delete from items", "delete"),
        ("((DELETE FROM t))", "DELETE"),
        ("INSERT INTO t VALUES (1)", "INSERT"),
        ("UPDATE t SET a = 1", "UPDATE"),
        ("MERGE INTO t USING s ON true WHEN MATCHED THEN DELETE", "MERGE"),
        ("DROP TABLE t", "DROP"),
        ("EXPLAIN SELECT 1", "EXPLAIN"),
        ("SUBSCRIBE t", "SUBSCRIBE"),
        ("'SELECT'", "'SELECT'"),
        ("WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d", "DELETE"),
        ("WITH a AS (SELECT 1), d AS ((UPDATE t SET a = 1 RETURNING a)) SELECT 1", "UPDATE"),
        ("WITH a AS (SELECT 1) DELETE FROM t", "DELETE"),
        ("WITH RECURSIVE d AS (INSERT INTO t VALUES (1) RETURNING *) TABLE d", "INSERT"),
        ("WITH a AS (SHOW clusters) SELECT 1", "SHOW"),
        ("SELECT * FROM (WITH d AS (DELETE FROM t RETURNING *) SELECT 1) s", "DELETE"),
        ("WITH a AS (SELECT * FROM (WITH b AS (MERGE INTO t USING s ON true WHEN MATCHED THEN DELETE) SELECT 1) s) TABLE a", "MERGE"),
        ("SELECT * INTO copy FROM t", "INTO"),
        ("/* SELECT */ DELETE FROM t", "DELETE"),
        ("/* /* */ SELECT 1 */ DELETE FROM t", "DELETE"),
        ("-- SELECT\nDELETE FROM t", "DELETE"),
        ("-- c\rSELECT 1 --\nDELETE FROM t", "-- c\r"),
        ("SELECT $x FROM t", "$x"),
        ("WITH (SELECT 1) SELECT 1", "(SELECT"),
        ("WITH a AS SELECT 1", "SELECT"),
        ("WITH a AS (SELECT 1)", ""),
        ("(((", ""),
        ("SELECT 1; DELETE FROM t", "; DELETE"),
    ] {
        let e = read_only_query(sql).expect_err(sql);
        assert!(sql[e.at..].starts_with(at), "{sql}: at {}: {}", e.at, e.message);
        assert!(at.is_empty() == (e.at == sql.len()), "{sql}: {}", e.message);
    }
    let e = read_only_query("DELETE FROM t").expect_err("delete");
    assert!(
        e.message.contains("read-only query") && e.message.contains("`DELETE`"),
        "{}",
        e.message
    );
}

#[test]
fn a_refused_query_points_at_its_keyword_in_the_file() {
    let position = |query: &str| {
        let text = format!("[[streams]]\npath = \"/a\"\nquery = {query}\n");
        let p = check(&text).expect_err(query);
        assert_eq!(p.len(), 1, "{p:?}");
        (p[0].line, p[0].column)
    };
    assert_eq!(position("\"DELETE FROM t\""), (3, 10));
    assert_eq!(position("'  delete from t'"), (3, 12));
    assert_eq!(position("\"DELETE FROM t WHERE a = \\\"x\\\"\""), (3, 10));
    assert_eq!(
        position("\"\"\"\nWITH d AS (\n  DELETE FROM t RETURNING *)\nSELECT 1\"\"\""),
        (5, 3)
    );
    assert_eq!(
        position("'''\nWITH d AS (\n  DELETE FROM t RETURNING *)\nSELECT 1'''"),
        (5, 3)
    );
    assert_eq!(position("\"SELECT 1; DROP TABLE t\""), (3, 18));
    // An escape before the keyword shifts source and value: the value's start stands in.
    assert_eq!(
        position("\"WITH \\\"d\\\" AS (DELETE FROM t RETURNING *) SELECT 1\""),
        (3, 9)
    );
    assert_eq!(position("\"\\tDELETE FROM t\""), (3, 9));
}

/// Line and column of byte `offset`, counted from the start of `text`.
fn naive_position(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

#[test]
fn positions_are_right_for_many_problems_on_many_lines_and_on_one() {
    // Non-ASCII before each problem: columns count characters, not bytes.
    let n = 60;
    let mut tables = String::new();
    let mut inline = String::from("streams = [");
    for i in 0..n {
        tables.push_str(&format!(
            "[[streams]] # é\npath = \"/s{i}\"\nview = \"v\"\ndelay = \"soon\"\n"
        ));
        inline.push_str(&format!(
            "{{ path = \"/s{i}\", query = \"SELECT 'é'\", delay = \"soon\" }}, "
        ));
    }
    inline.push_str("]\n");
    for text in [tables, inline] {
        let p = check(&text).expect_err("invalid");
        assert_eq!(p.len(), n);
        let expected: Vec<(usize, usize)> = text
            .match_indices("\"soon\"")
            .map(|(offset, _)| naive_position(&text, offset))
            .collect();
        let got: Vec<(usize, usize)> = p.iter().map(|p| (p.line, p.column)).collect();
        assert_eq!(got, expected);
    }
}

#[test]
fn past_a_hundred_problems_the_first_are_listed_and_the_rest_counted() {
    let n = 4_000;
    let mut text = String::new();
    for i in 0..n {
        text.push_str(&format!(
            "[[streams]]\npath = \"/s{i}\"\nview = \"v\"\ndelay = \"soon\"\n"
        ));
    }
    // Found in another order than the file's: the section first, then the streams.
    text.push_str("[server]\nheartbeat = \"often\"\n");
    let e = parse(Path::new("big.toml"), &text).expect_err("invalid");
    assert_eq!(e.total(), n + 1);
    let lines: Vec<usize> = e.problems().iter().map(|p| p.line).collect();
    assert_eq!(
        lines,
        (0..MAX_LISTED).map(|i| 4 * i + 4).collect::<Vec<_>>()
    );
    let report = e.to_string();
    assert!(
        report.starts_with("4,001 problem(s) in big.toml\n  big.toml:4:9: bad duration"),
        "{}",
        &report[..200]
    );
    assert!(
        report.ends_with("\n  ... and 3,901 more problems"),
        "{}",
        &report[report.len() - 200..]
    );
    assert_eq!(report.lines().count(), 1 + MAX_LISTED + 1);

    let e = parse(Path::new("a.toml"), "[server]\nheartbeat = \"often\"\n").expect_err("bad");
    assert_eq!((e.total(), e.problems().len()), (1, 1));
    assert!(!e.to_string().contains("more problem"));
    assert_eq!(thousands(0), "0");
    assert_eq!(thousands(999), "999");
    assert_eq!(thousands(1_000), "1,000");
    assert_eq!(thousands(1_234_567), "1,234,567");
}

#[test]
fn syntax_errors_have_a_position() {
    let problems = check("[[streams]]\npath = \"/a\nview = \"v\"\n").expect_err("invalid");
    assert_eq!(problems.len(), 1);
    assert_eq!(problems[0].line, 2);
}

#[test]
fn empty_and_unknown_sections_are_rejected() {
    assert!(check("   \n").is_err());
    let p = check("[serverr]\n[[streams]]\npath = \"/a\"\nview = \"v\"\n").expect_err("bad");
    assert!(p[0].message.contains("serverr"));
}

#[test]
fn secrets_never_sit_in_the_url() {
    let p = check(
        "[upstream]\nurl = \"postgres://u:hunter2@127.0.0.1:6875/materialize\"\n\
         [[streams]]\npath = \"/a\"\nview = \"v\"\n",
    )
    .expect_err("bad");
    assert!(p[0].message.contains("password"));
    for url in [
        "postgres://u@db.example:6875/materialize",
        "postgres://u@db.example:6875/materialize?sslmode=prefer",
    ] {
        let p = check(&format!(
            "[upstream]\nurl = \"{url}\"\n[[streams]]\npath = \"/a\"\nview = \"v\"\n"
        ))
        .expect_err("prefer");
        assert!(p[0].message.contains("sslmode=require"), "{url}");
    }
    let c = check(
        "[upstream]\nurl = \"postgres://u@127.0.0.1:6875/materialize?sslmode=require\"\n\
         password_env = \"MZ_PASSWORD\"\n[[streams]]\npath = \"/a\"\nview = \"v\"\n",
    )
    .expect("valid");
    assert_eq!(
        c.upstream.password,
        Some(PasswordSource::Env("MZ_PASSWORD".into()))
    );
}

#[test]
fn reserved_and_malformed_names_are_rejected() {
    for (line, needle) in [
        ("path = \"/\"\nview = \"v\"", "reserved"),
        ("path = \"/_tailgate/x\"\nview = \"v\"", "reserved"),
        ("path = \"x\"\nview = \"v\"", "start with"),
        ("path = \"/a\"\nview = \"v; DROP TABLE t\"", "relation name"),
        (
            "path = \"/a\"\nview = \"v\"\nevent = \"snapshot\"",
            "reserved",
        ),
        (
            "path = \"/a\"\nview = \"v\"\nevent = \"a\\nb\"",
            "event name",
        ),
        ("path = \"/a\"\nview = \"v\"\nkey = []", "at least one"),
        (
            "path = \"/a\"\nquery = \"SELECT 1; SELECT 2\"",
            "single statement",
        ),
        ("path = \"/a\"\nview = \"v\"\nhistory = 0", "at least 1"),
    ] {
        let p = check(&format!("[[streams]]\n{line}\n")).expect_err(line);
        assert!(
            p.iter().any(|p| p.message.contains(needle)),
            "{line}: {p:?}"
        );
    }
}

#[test]
fn reserved_words_are_refused_as_names() {
    assert!(
        RESERVED_WORDS.windows(2).all(|w| w[0] < w[1]),
        "sorted, unique"
    );
    for (entry, line, column, word) in [
        ("view = \"select\"", 3, 9, "select"),
        ("view = \"public.Order\"", 3, 16, "Order"),
        ("view = \"v\"\nkey = [\"id\", \"USER\"]", 4, 14, "USER"),
        ("view = \"v\"\ncluster = \"default\"", 4, 11, "default"),
        ("view = \"v\"\nkey = [\"join\"]", 4, 8, "join"),
    ] {
        let p = check(&format!("[[streams]]\npath = \"/a\"\n{entry}\n")).expect_err(entry);
        assert_eq!(p.len(), 1, "{entry}: {p:?}");
        assert_eq!((p[0].line, p[0].column), (line, column), "{entry}: {p:?}");
        assert!(
            p[0].message.contains("reserved SQL word") && p[0].message.contains(word),
            "{entry}: {p:?}"
        );
    }
    // Words that merely contain or resemble one, and unreserved keywords, pass.
    check(
        "[[streams]]\npath = \"/a\"\nview = \"orders.selection\"\n\
         key = [\"user_id\", \"delete\", \"key\"]\ncluster = \"serving\"\n",
    )
    .expect("valid");
}

#[test]
fn upstream_change_detection() {
    let c = check("[[streams]]\npath = \"/a\"\nview = \"v\"\n").expect("valid");
    let a = (*c.streams[0]).clone();
    let mut b = a.clone();
    b.delay = Duration::from_secs(3);
    b.event = "other".into();
    assert!(!a.upstream_differs(&b));
    b.cluster = Some("serving".into());
    assert!(a.upstream_differs(&b));
}

#[test]
fn auth_configs_are_validated_for_safety() {
    let issuer = |keys: &str, algs: &str| {
        format!(
            "[auth]\nmode = \"jwt\"\n[[auth.issuers]]\niss = \"https://idp/\"\naudience = [\"t\"]\n\
             algorithms = [{algs}]\n{keys}\n[[streams]]\npath = \"/a\"\nview = \"v\"\n"
        )
    };
    let ok = check(&issuer("jwks_file = \"keys.json\"", "\"RS256\", \"ES256\"")).expect("valid");
    assert_eq!(ok.auth.mode, AuthMode::Jwt);
    assert_eq!(
        ok.auth.token_sources,
        vec![
            TokenSource::Header,
            TokenSource::Cookie("tailgate_token".into())
        ]
    );
    assert!(matches!(&ok.auth.issuers[0].keys, KeySource::JwksFile(p) if p.ends_with("keys.json")));
    for (text, needle) in [
        (issuer("public_key_file = \"k.pem\"", "\"HS256\""), "never a public key"),
        (issuer("jwks_file = \"k.json\"", "\"RS256\", \"HS256\""), "never a public key"),
        (issuer("secret_env = \"S\"", "\"RS256\""), "needs a public key"),
        (issuer("secret_env = \"S\"\njwks_file = \"k.json\"", "\"HS256\""), "exactly one key source"),
        (issuer("", "\"RS256\""), "exactly one key source"),
        (issuer("jwks_file = \"k.json\"", "\"none\""), "unknown algorithm"),
        (issuer("jwks_url = \"http://idp.example/jwks\"", "\"RS256\""), "must be https"),
        (issuer("jwks_url = \"https://idp.example/jwks\"\njwks_refresh = \"1s\"", "\"RS256\""), "at least 30s"),
        (issuer("jwks_file = \"k.json\"\njwks_refresh = \"5m\"", "\"RS256\""), "only applies with `jwks_url`"),
        (
            "[auth]\nmode = \"jwt\"\nleeway = \"5m\"\n[[auth.issuers]]\niss = \"i\"\naudience = [\"t\"]\nalgorithms = [\"HS256\"]\nsecret_env = \"S\"\n[[streams]]\npath = \"/a\"\nview = \"v\"\n".to_string(),
            "at most 60s",
        ),
        (
            "[auth]\nmode = \"jwt\"\n[[streams]]\npath = \"/a\"\nview = \"v\"\n".to_string(),
            "at least one `[[auth.issuers]]`",
        ),
        (
            "[auth]\ntoken_sources = [\"header\", \"url:x\"]\n[[streams]]\npath = \"/a\"\nview = \"v\"\n".to_string(),
            "token source",
        ),
        (
            "[[streams]]\npath = \"/a\"\nview = \"v\"\nauthorize = { claim = \"/roles\", any_of = [\"ops\"] }\n".to_string(),
            "needs `[auth] mode = \"jwt\"`",
        ),
        (
            "[defaults]\nauthorize = { claim = \"/roles\", any_of = [\"ops\"] }\n[[streams]]\npath = \"/a\"\nview = \"v\"\n".to_string(),
            "needs `[auth] mode = \"jwt\"`",
        ),
        (
            "[server]\ncors_origins = [\"*\"]\ncors_credentials = true\n[[streams]]\npath = \"/a\"\nview = \"v\"\n".to_string(),
            "cors_credentials",
        ),
    ] {
        let problems = check(&text).expect_err(needle);
        assert!(
            problems.iter().any(|p| p.message.contains(needle)),
            "{needle}: {problems:?}"
        );
    }
    // Rules: defaults apply unless a stream is public or has its own; both is an error.
    let base = "[auth]\nmode = \"jwt\"\n[[auth.issuers]]\niss = \"i\"\naudience = [\"t\"]\n\
                algorithms = [\"HS256\"]\nsecret_env = \"S\"\n\
                [defaults]\nauthorize = { claim = \"/roles\", any_of = [\"ops\"] }\n";
    let c = check(&format!(
        "{base}[[streams]]\npath = \"/a\"\nview = \"v\"\n\
         [[streams]]\npath = \"/b\"\nview = \"v\"\npublic = true\n\
         [[streams]]\npath = \"/c\"\nview = \"v\"\nauthorize = {{ claim = \"/sub\", any_of = [\"x\"] }}\n"
    ))
    .expect("valid");
    assert_eq!(
        c.streams[0].authorize.as_ref().map(|a| a.claim.as_str()),
        Some("/roles")
    );
    assert!(c.streams[1].public && c.streams[1].authorize.is_none());
    assert_eq!(
        c.streams[2].authorize.as_ref().map(|a| a.claim.as_str()),
        Some("/sub")
    );
    let both = check(&format!(
        "{base}[[streams]]\npath = \"/a\"\nview = \"v\"\npublic = true\n\
         authorize = {{ claim = \"/sub\", any_of = [\"x\"] }}\n"
    ))
    .expect_err("both");
    assert!(both[0].message.contains("not both"), "{both:?}");
    let bad_pointer = check(&format!(
        "{base}[[streams]]\npath = \"/a\"\nview = \"v\"\nauthorize = {{ claim = \"roles\", any_of = [\"x\"] }}\n"
    ))
    .expect_err("pointer");
    assert!(
        bad_pointer[0].message.contains("JSON Pointer"),
        "{bad_pointer:?}"
    );
}

#[test]
fn scoped_streams_are_read_and_their_mistakes_placed() {
    let c = check(
        "[auth]\nmode = \"jwt\"\n[[auth.issuers]]\niss = \"i\"\naudience = [\"a\"]\n\
         algorithms = [\"HS256\"]\nsecret_env = \"S\"\n\
         [defaults]\nmax_partitions = 50\n\
         [[streams]]\npath = \"/orders/{customer_id}/by/{region}\"\nview = \"orders\"\n\
         key = [\"id\"]\nfilters = [\"status\"]\ncolumns = [\"id\", \"status\"]\n\
         scope = { column = \"tenant\", claim = \"/org/id\" }\n",
    )
    .expect("valid");
    let s = &c.streams[0];
    assert_eq!(s.params, ["customer_id", "region"]);
    assert_eq!(s.filters, ["status"]);
    assert_eq!(s.partition_columns(), ["customer_id", "region", "tenant"]);
    assert_eq!(s.max_partitions, 50);
    assert!(s.is_scoped());

    let problems = check(
        "[[streams]]\npath = \"/a/{1x}/{b}/{b}/c{d}\"\nview = \"v\"\n\
         filters = [\"b\", \"s\", \"s\", \"a b\"]\nkey = [\"k\"]\ncolumns = [\"x\"]\n\
         scope = { column = \"t\", claim = \"tenant\" }\nmax_partitions = 0\n\
         [[streams]]\npath = \"/a/{other}/{b}/{b2}/c{d}\"\nview = \"v\"\n\
         [[streams]]\npath = \"/z/{q}\"\nview = \"v\"\n\
         [[streams]]\npath = \"/z/{r}\"\nview = \"v\"\n",
    )
    .expect_err("invalid");
    let messages: Vec<String> = problems
        .iter()
        .map(|p| format!("{}:{} {}", p.line, p.column, p.message))
        .collect();
    let has = |at: &str, needle: &str| {
        assert!(
            messages
                .iter()
                .any(|m| m.starts_with(at) && m.contains(needle)),
            "no {at} {needle:?} in {messages:#?}"
        )
    };
    has("2:12 ", "{1x} must be a plain column name");
    has("2:21 ", "{b} appears twice");
    has("2:25 ", "may only hold letters");
    has("4:12 ", "\"b\" is already a path parameter");
    has("4:22 ", "\"s\" is listed twice");
    has("4:27 ", "\"a b\" is not a plain column name");
    has("6:11 ", "must include the key column \"k\"");
    has("7:33 ", "must be a JSON Pointer");
    has("7:9 ", "`scope` needs `[auth] mode = \"jwt\"`");
    has("8:18 ", "max_partitions");
    has("10:29 ", "may only hold letters");
    has("16:8 ", "another template matches the same requests");
}
