//! The public API: the README session, every client error of API.md with its status and
//! message (and no count changed), compatibility details, the operational endpoints,
//! passivation and graceful shutdown. Cases that need no kill, restart or process
//! environment run in-process (`InProcess`: `service::start` on port 0); the others
//! against the real binary (`Server`).

mod common;

use common::{agent, call, get, random_rides, Expected, InProcess, Server, Sse};
use serde_json::Value;

const JSON: (&str, &str) = ("Content-Type", "application/json");

fn json(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

#[test]
fn readme_session_and_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Server::start(dir.path(), &[]);
    let a = agent();
    let (code, body) = call(&a, "POST", &s.url("/skiers/1/seasons/2025/days/1/skiers/7"), &[JSON], Some(r#"{"time":10,"liftID":5}"#));
    assert_eq!((code, body.as_str()), (201, ""));
    let check = |s: &Server| {
        assert_eq!(get(&a, &s.url("/skiers/1/seasons/2025/days/1/skiers/7")), (200, "50".to_string()));
        let (code, body) = get(&a, &s.url("/resorts/1/seasons/2025/day/1/skiers"));
        assert_eq!(code, 200);
        assert_eq!(json(&body), json(r#"{"time":"Alpine Meadows","numSkiers":1}"#));
        let (code, body) = get(&a, &s.url("/skiers/7/vertical?resort=1"));
        assert_eq!(code, 200);
        assert_eq!(json(&body), json(r#"{"resorts":[{"seasonID":"2025","totalVert":50}]}"#));
        let (code, body) = get(&a, &s.url("/resorts/1/seasons"));
        assert_eq!((code, json(&body)), (200, json(r#"{"seasons":["2025"]}"#)));
    };
    check(&s);
    s.kill9();
    s.restart();
    check(&s);
}

#[test]
fn every_bad_input_gets_its_4xx_with_a_message_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let s = InProcess::start(dir.path(), &["--set", "http.base_path=skiers-app"]);
    let a = agent();
    let ride = "/skiers-app/skiers/1/seasons/2025/days/1/skiers/7";
    assert_eq!(call(&a, "POST", &s.url(ride), &[JSON], Some(r#"{"time":10,"liftID":5}"#)).0, 201);
    let long_key = "k".repeat(300);
    let big = format!(r#"{{"time":10,"liftID":5,"pad":"{}"}}"#, "x".repeat(20_000));
    let deep = format!("{}{}", "[".repeat(5000), "]".repeat(5000));
    // (method, path, headers, body, expected status)
    type Case<'a> = (&'a str, String, Vec<(&'a str, &'a str)>, Option<String>, u16);
    let cases: Vec<Case> = vec![
        ("POST", "/skiers-app/skiers/abc/seasons/2025/days/1/skiers/7".into(), vec![JSON], Some(r#"{"time":10,"liftID":5}"#.into()), 400),
        ("POST", "/skiers-app/skiers/1/seasons/20x5/days/1/skiers/7".into(), vec![JSON], Some(r#"{"time":10,"liftID":5}"#.into()), 400),
        ("POST", "/skiers-app/skiers/1/seasons/2025/days/367/skiers/7".into(), vec![JSON], Some(r#"{"time":10,"liftID":5}"#.into()), 400),
        ("POST", "/skiers-app/skiers/1/seasons/2025/days/1/skiers/0".into(), vec![JSON], Some(r#"{"time":10,"liftID":5}"#.into()), 400),
        (
            "POST",
            "/skiers-app/skiers/1/seasons/2025/days/1/skiers/99999999999999999999".into(),
            vec![JSON],
            Some(r#"{"time":10,"liftID":5}"#.into()),
            400,
        ),
        ("POST", "/skiers-app/skiers/1/seasons/2025/days/1/skiers/-7".into(), vec![JSON], Some(r#"{"time":10,"liftID":5}"#.into()), 400),
        (
            "POST",
            "/skiers-app/skiers/1/seasons/2025/days/1/skiers/%E2%9C%93".into(),
            vec![JSON],
            Some(r#"{"time":10,"liftID":5}"#.into()),
            400,
        ),
        ("POST", ride.into(), vec![JSON], Some(r#"{"time":10,"liftID":41}"#.into()), 400),
        ("POST", ride.into(), vec![JSON], Some(r#"{"time":0,"liftID":5}"#.into()), 400),
        ("POST", ride.into(), vec![JSON], Some(r#"{"time":361,"liftID":5}"#.into()), 400),
        ("POST", ride.into(), vec![JSON], Some(r#"{"time":10}"#.into()), 400),
        ("POST", ride.into(), vec![JSON], Some(r#"{"time":"10","liftID":5}"#.into()), 400),
        ("POST", ride.into(), vec![JSON], Some(r#"{"time":10.5,"liftID":5}"#.into()), 400),
        ("POST", ride.into(), vec![JSON], Some(r#"{"time":1e99,"liftID":5}"#.into()), 400),
        ("POST", ride.into(), vec![JSON], Some(r#"{"time":10,"liftID":5"#.into()), 400),
        ("POST", ride.into(), vec![JSON], Some("".into()), 400),
        ("POST", ride.into(), vec![JSON], Some("null".into()), 400),
        ("POST", ride.into(), vec![JSON], Some(deep), 400),
        ("POST", ride.into(), vec![JSON], Some(big), 413),
        ("POST", ride.into(), vec![("Content-Type", "text/plain")], Some(r#"{"time":10,"liftID":5}"#.into()), 415),
        ("POST", ride.into(), vec![JSON, ("Idempotency-Key", &long_key)], Some(r#"{"time":10,"liftID":5}"#.into()), 400),
        ("POST", "/skiers-app/skiers/11/seasons/2025/days/1/skiers/7".into(), vec![JSON], Some(r#"{"time":10,"liftID":5}"#.into()), 404),
        ("DELETE", ride.into(), vec![], None, 405),
        ("PUT", "/skiers-app/resorts".into(), vec![JSON], Some("{}".into()), 405),
        ("GET", "/skiers-app/skiers/1/seasons/2025/days/1/skiers/8".into(), vec![], None, 404),
        ("GET", "/skiers-app/skiers/7/vertical".into(), vec![], None, 400),
        ("GET", "/skiers-app/skiers/7/vertical?resort=x".into(), vec![], None, 400),
        ("GET", "/skiers-app/skiers/7/vertical?resort=12".into(), vec![], None, 404),
        ("GET", "/skiers-app/skiers/7/vertical?resort=1&season=2024".into(), vec![], None, 404),
        ("GET", "/skiers-app/skiers/8/vertical?resort=1".into(), vec![], None, 404),
        ("GET", "/skiers-app/resorts/0/seasons".into(), vec![], None, 400),
        ("GET", "/skiers-app/resorts/11/seasons/2025/day/1/skiers".into(), vec![], None, 404),
        ("GET", "/skiers-app/resorts/1/seasons/2025/day/0/skiers".into(), vec![], None, 400),
        ("POST", "/skiers-app/resorts/1/seasons".into(), vec![JSON], Some(r#"{"year":"25"}"#.into()), 400),
        ("POST", "/skiers-app/resorts/1/seasons".into(), vec![JSON], Some(r#"{"year":2025}"#.into()), 400),
        ("GET", "/skiers-app/nothing/here".into(), vec![], None, 404),
        ("GET", "/skiers/1/seasons/2025/days/1/skiers/7".into(), vec![], None, 404),
    ];
    for (method, path, headers, body, want) in cases {
        let (code, text) = call(&a, method, &s.url(&path), &headers, body.as_deref());
        assert_eq!(code, want, "{method} {path}: {text}");
        assert!(!text.is_empty(), "{method} {path}: empty body");
        let msg = json(&text)["message"].as_str().map(str::to_string);
        assert!(msg.is_some_and(|m| m.len() > 5), "{method} {path}: no message in {text}");
    }
    // Nothing above changed a count.
    assert_eq!(get(&a, &s.url(ride)), (200, "50".into()));
    let (_, body) = get(&a, &s.url("/skiers-app/resorts/1/seasons/2025/day/1/skiers"));
    assert_eq!(json(&body)["numSkiers"], 1);
    let (_, body) = get(&a, &s.url("/skiers-app/resorts/1/seasons"));
    assert_eq!(json(&body), json(r#"{"seasons":["2025"]}"#));
}

#[test]
fn compatibility_details() {
    let dir = tempfile::tempdir().unwrap();
    let s = InProcess::start(dir.path(), &[]);
    let a = agent();
    // Java's HttpClient asks for h2c on plain http; we answer in HTTP/1.1.
    let h2c = [("Connection", "Upgrade, HTTP2-Settings"), ("Upgrade", "h2c"), ("HTTP2-Settings", "AAMAAABkAARAAAAAAAIAAAAA"), JSON];
    let (code, _) =
        call(&a, "POST", &s.url("/skiers/2/seasons/2025/days/3/skiers/9"), &h2c, Some(r#"{"time":1,"liftID":40,"waitTime":3}"#));
    assert_eq!(code, 201);
    let (code, body) = call(&a, "GET", &s.url("/skiers/2/seasons/2025/days/3/skiers/9"), &h2c[..3], None);
    assert_eq!((code, body.as_str()), (200, "400"));
    // Seasons: created by POST and by rides, listed once each.
    assert_eq!(call(&a, "POST", &s.url("/resorts/2/seasons"), &[JSON], Some(r#"{"year":"2024"}"#)).0, 201);
    assert_eq!(call(&a, "POST", &s.url("/resorts/2/seasons"), &[JSON], Some(r#"{"year":"2024"}"#)).0, 201);
    let (_, body) = get(&a, &s.url("/resorts/2/seasons"));
    assert_eq!(json(&body), json(r#"{"seasons":["2024","2025"]}"#));
    let (_, body) = get(&a, &s.url("/resorts"));
    let v = json(&body);
    assert_eq!(v["resorts"].as_array().unwrap().len(), 10);
    assert_eq!(v["resorts"][0]["resortID"], 1);
    // Repeated resort parameters sum per season.
    call(&a, "POST", &s.url("/skiers/3/seasons/2025/days/1/skiers/9"), &[JSON], Some(r#"{"time":2,"liftID":1}"#));
    let (_, body) = get(&a, &s.url("/skiers/9/vertical?resort=2&resort=3"));
    assert_eq!(json(&body), json(r#"{"resorts":[{"seasonID":"2025","totalVert":410}]}"#));
    // ETag round trip.
    let r = a.get(&s.url("/resorts")).call().unwrap();
    let etag = r.header("etag").unwrap().to_string();
    let r = a.get(&s.url("/resorts")).set("If-None-Match", &etag).call().unwrap();
    assert_eq!(r.status(), 304);
    // Statistics report what was called.
    let (_, body) = get(&a, &s.url("/statistics"));
    let stats = json(&body);
    let ops: Vec<(String, String)> = stats["endpointStats"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["operation"].as_str().unwrap().into(), e["URL"].as_str().unwrap().into()))
        .collect();
    assert!(ops.contains(&("POST".into(), "/skiers/{resortID}/seasons/{seasonID}/days/{dayID}/skiers/{skierID}".into())), "{ops:?}");
    assert!(ops.contains(&("GET".into(), "/resorts".into())));
}

#[test]
fn openapi_lists_exactly_the_routes_we_serve() {
    let dir = tempfile::tempdir().unwrap();
    let s = InProcess::start(dir.path(), &[]);
    let a = agent();
    let (code, body) = get(&a, &s.url("/openapi.json"));
    assert_eq!(code, 200);
    let doc = json(&body);
    let mut documented = Vec::new();
    for (path, ops) in doc["paths"].as_object().unwrap() {
        for method in ops.as_object().unwrap().keys() {
            documented.push((method.to_uppercase(), path.clone()));
        }
    }
    documented.sort();
    let mut served: Vec<(String, String)> = liftlog::http::ROUTES.iter().map(|(m, p, _)| (m.to_string(), p.to_string())).collect();
    served.sort();
    assert_eq!(documented, served);
    // And every listed route really is served (not the catch-all 404).
    for (method, path, _) in liftlog::http::ROUTES {
        let concrete = path.replace("{resortID}", "1").replace("{seasonID}", "2025").replace("{dayID}", "1").replace("{skierID}", "5");
        let body = (*method == "POST").then_some("{}");
        let (_, text) = call(&a, method, &s.url(&concrete), &[JSON], body);
        assert!(!text.contains("No such endpoint"), "{method} {path} is documented but not served");
    }
}

#[test]
fn operations_endpoints_and_admin_token() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path(), &["--admin-token", "s3cret"]);
    let a = agent();
    assert_eq!(get(&a, &s.url("/health")).0, 200);
    assert_eq!(get(&a, &s.url("/ready")).0, 200);
    // Every admin route of the route table, so a new one is held to the token too.
    let admin_routes = liftlog::http::ROUTES.iter().filter(|(_, p, _)| p.starts_with("/admin/") || *p == "/metrics");
    let mut checked = 0;
    for (method, path, _) in admin_routes {
        assert_eq!(call(&a, method, &s.url(path), &[], None).0, 401, "{method} {path} without token");
        let (code, _) = call(&a, method, &s.url(path), &[("Authorization", "Bearer wrong!")], None);
        assert_eq!(code, 401, "{method} {path} with a wrong token");
        checked += 1;
    }
    assert_eq!(checked, 5);
    let auth = [("Authorization", "Bearer s3cret")];
    for r in random_rides(7, 50, 10) {
        assert_eq!(r.post(&a, &s.base), 201);
    }
    let (code, body) = call(&a, "POST", &s.url("/admin/flush"), &auth, None);
    assert_eq!(code, 200, "{body}");
    let (code, body) = call(&a, "GET", &s.url("/admin/actors"), &auth, None);
    assert_eq!(code, 200);
    let v = json(&body);
    let applied: u64 = v["actors"].as_array().unwrap().iter().map(|x| x["events_applied"].as_u64().unwrap()).sum();
    assert_eq!(applied, 50);
    assert!(v["actors"].as_array().unwrap().iter().all(|x| x["dirty_skiers"] == 0));
    let (code, body) = call(&a, "GET", &s.url("/admin/wal"), &auth, None);
    assert_eq!(code, 200);
    let v = json(&body);
    assert_eq!(v["wal"]["checkpoint"], v["consumer"]["dispatched_seq"]);
    let (code, text) = call(&a, "GET", &s.url("/metrics"), &auth, None);
    assert_eq!(code, 200);
    assert!(text.contains("liftlog_bus_published_total 50"), "{text}");
    // The histograms, after 50 POSTs: every family, and the POST route's series with its
    // bounded labels, increasing buckets ending in +Inf, and a count of at least the 50.
    for family in liftlog::metrics::HISTOGRAM_FAMILIES {
        assert!(text.contains(&format!("# TYPE {family} histogram")), "{family} missing:\n{text}");
    }
    let post = r#"method="POST",route="/skiers/{resortID}/seasons/{seasonID}/days/{dayID}/skiers/{skierID}",status="2xx""#;
    let buckets: Vec<(f64, f64)> = text
        .lines()
        .filter_map(|l| l.strip_prefix(&format!("liftlog_http_request_duration_seconds_bucket{{{post},le=\"")))
        .map(|rest| {
            let (le, count) = rest.split_once("\"} ").unwrap();
            (if le == "+Inf" { f64::INFINITY } else { le.parse().unwrap() }, count.parse().unwrap())
        })
        .collect();
    assert!(buckets.len() > 10, "{text}");
    assert!(buckets.windows(2).all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1), "{buckets:?}");
    assert_eq!(buckets.last().unwrap().0, f64::INFINITY);
    assert!(buckets.last().unwrap().1 >= 50.0, "{buckets:?}");
    assert!(text.contains("liftlog_wal_fsync_duration_seconds_count "), "{text}");
    // Still behind the token.
    assert_eq!(call(&a, "GET", &s.url("/metrics"), &[], None).0, 401);
}

#[test]
fn admin_routes_live_on_their_own_loopback_listener() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path(), &["--admin-listen", "127.0.0.1:0"]);
    let admin = s.admin.clone().expect("an admin listener");
    assert!(admin.starts_with("http://127.0.0.1:"), "{admin}");
    let a = agent();
    for path in ["/admin/actors", "/admin/wal", "/metrics"] {
        let (code, body) = get(&a, &s.url(path));
        assert_eq!(code, 404, "{path} must not be on the public listener: {body}");
        assert_eq!(get(&a, &format!("{admin}{path}")).0, 200, "{path} on the admin listener");
    }
    assert_eq!(call(&a, "POST", &format!("{admin}/admin/flush"), &[], None).0, 200);
    assert_eq!(get(&a, &format!("{admin}/ready")).0, 200);
    // The public API is not on the admin listener.
    assert_eq!(get(&a, &format!("{admin}/resorts")).0, 404);
    assert_eq!(get(&a, &s.url("/resorts")).0, 200);
}

/// A node that keeps at most 2 days resident and flushes every 20 ms: most of the 9
/// resort-days of `random_rides` live in the tables.
fn passivating_node(dir: &std::path::Path) -> Server {
    Server::start(dir, &["--set", "actors.max_resident_days=2", "--set", "flush.interval_ms=20"])
}

/// Waits on the registry's own figure, not a fixed sleep, until some day was passivated.
fn wait_for_passivations(a: &ureq::Agent, s: &Server, what: &str) {
    let passivations = || json(&call(a, "GET", &s.url("/admin/actors"), &[], None).1)["registry"]["passivations"].as_u64().unwrap();
    common::wait_for(what, std::time::Duration::from_secs(30), || passivations() > 0);
}

#[test]
fn passivated_days_answer_from_the_tables_and_reload_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let s = passivating_node(dir.path());
    let a = agent();
    let rides = random_rides(11, 600, 40);
    for r in &rides[..300] {
        assert_eq!(r.post(&a, &s.base), 201);
    }
    // Days must have been passivated before the duplicates below go to them.
    wait_for_passivations(&a, &s, "passivations after the first 300 rides");
    for r in &rides[..300] {
        assert_eq!(r.post(&a, &s.base), 201); // duplicates, some into passivated days
    }
    for r in &rides[300..] {
        assert_eq!(r.post(&a, &s.base), 201);
    }
    let bad = Expected::from(&rides).check(&a, &s.base);
    assert!(bad.is_empty(), "{:?}", &bad[..bad.len().min(5)]);
}

/// The day's leaders (ours, not SkiDataAPI's) match a model of the rides that got 201, from
/// resident actors and, for the passivated days, from the tables; `limit` is bounded.
#[test]
fn day_leaders_and_lift_activity_are_exact_from_actors_and_tables() {
    let dir = tempfile::tempdir().unwrap();
    let s = passivating_node(dir.path());
    let a = agent();
    let rides = random_rides(29, 900, 60);
    for r in &rides {
        assert_eq!(r.post(&a, &s.base), 201);
    }
    // Retries (same Idempotency-Key) are duplicates: they must move no figure below.
    for r in rides.iter().step_by(7) {
        assert_eq!(r.post(&a, &s.base), 201);
    }
    wait_for_passivations(&a, &s, "days passivated to the tables");
    // The model: per resort-day, per skier, (vertical, rides); default catalog: lift n = n × 10 m.
    type Skiers = std::collections::BTreeMap<u32, (u64, u64)>;
    let mut days: std::collections::BTreeMap<(u32, u16, u16), Skiers> = Default::default();
    for r in &rides {
        let e = days.entry((r.at.resort, r.at.season, r.at.day)).or_default().entry(r.skier).or_default();
        e.0 += r.lift as u64 * 10;
        e.1 += 1;
    }
    assert!(days.len() > 2, "more days than may be resident");
    for ((resort, season, day), skiers) in &days {
        let mut want: Vec<(u32, u64, u64)> = skiers.iter().map(|(k, (v, n))| (*k, *v, *n)).collect();
        want.sort_by(|x, y| y.1.cmp(&x.1).then(x.0.cmp(&y.0)));
        for (query, n) in [("", 10), ("?limit=3", 3), ("?limit=100", 100)] {
            let (code, body) = get(&a, &s.url(&format!("/resorts/{resort}/seasons/{season}/day/{day}/leaders{query}")));
            assert_eq!(code, 200, "{body}");
            let got = json(&body);
            assert_eq!(got["numSkiers"], skiers.len(), "{resort}/{season}/{day}: {body}");
            let leaders: Vec<(u32, u64, u64)> = got["leaders"]
                .as_array()
                .unwrap()
                .iter()
                .map(|l| (l["skierID"].as_u64().unwrap() as u32, l["vertical"].as_u64().unwrap(), l["rides"].as_u64().unwrap()))
                .collect();
            assert_eq!(leaders, want[..n.min(want.len())], "{resort}/{season}/{day}{query}");
        }
    }
    // Lift activity: rides per lift per bucket of `time`, against the same model of 201s.
    for bucket in [15u16, 1, 60] {
        let width = 360usize.div_ceil(bucket as usize);
        let mut want: std::collections::BTreeMap<(u32, u16, u16), std::collections::BTreeMap<u64, Vec<u64>>> = Default::default();
        for r in &rides {
            let row = want.entry((r.at.resort, r.at.season, r.at.day)).or_default().entry(r.lift as u64).or_insert_with(|| vec![0; width]);
            row[(r.time as usize - 1) / bucket as usize] += 1;
        }
        for ((resort, season, day), lifts) in &want {
            let (code, body) = get(&a, &s.url(&format!("/resorts/{resort}/seasons/{season}/day/{day}/lifts?bucket={bucket}")));
            assert_eq!(code, 200, "{body}");
            let got = json(&body);
            assert_eq!((got["bucketMinutes"].as_u64(), got["unplacedRides"].as_u64()), (Some(bucket as u64), Some(0)), "{body}");
            let got: std::collections::BTreeMap<u64, Vec<u64>> = got["lifts"]
                .as_array()
                .unwrap()
                .iter()
                .map(|l| (l["liftID"].as_u64().unwrap(), l["buckets"].as_array().unwrap().iter().map(|n| n.as_u64().unwrap()).collect()))
                .collect();
            assert_eq!(&got, lifts, "{resort}/{season}/{day} in {bucket}-minute buckets");
        }
    }
    // The summary (what the stream carries) agrees with both, from one read.
    for ((resort, season, day), skiers) in &days {
        let (code, body) = get(&a, &s.url(&format!("/resorts/{resort}/seasons/{season}/day/{day}/summary")));
        assert_eq!(code, 200, "{body}");
        let got = json(&body);
        let rides_of_day: u64 = skiers.values().map(|(_, n)| n).sum();
        assert_eq!((got["numSkiers"].as_u64(), got["rides"].as_u64()), (Some(skiers.len() as u64), Some(rides_of_day)), "{body}");
        let leaders = json(&get(&a, &s.url(&format!("/resorts/{resort}/seasons/{season}/day/{day}/leaders"))).1);
        let lifts = json(&get(&a, &s.url(&format!("/resorts/{resort}/seasons/{season}/day/{day}/lifts"))).1);
        assert_eq!((&got["leaders"], &got["activity"]), (&leaders["leaders"], &lifts), "{resort}/{season}/{day}");
    }
    for bad in ["0", "61", "x", ""] {
        let (code, body) = get(&a, &s.url(&format!("/resorts/1/seasons/2025/day/1/lifts?bucket={bad}")));
        assert_eq!(code, 400, "bucket={bad}: {body}");
        assert!(body.contains("bucket must be a whole number of minutes from 1 to 60"), "{body}");
    }
    let (code, body) = get(&a, &s.url("/resorts/1/seasons/2025/day/300/leaders"));
    assert_eq!((code, json(&body)), (200, json(r#"{"numSkiers":0,"leaders":[]}"#)), "a day without rides");
    for bad in ["0", "101", "ten", "-1", ""] {
        let (code, body) = get(&a, &s.url(&format!("/resorts/1/seasons/2025/day/1/leaders?limit={bad}")));
        assert_eq!(code, 400, "limit={bad}: {body}");
        assert!(body.contains("limit must be a whole number from 1 to 100"), "{body}");
    }
    assert_eq!(get(&a, &s.url("/resorts/999/seasons/2025/day/1/leaders")).0, 404, "an unknown resort");
}

#[test]
fn sigterm_is_graceful_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Server::start(dir.path(), &["--set", "flush.interval_ms=60000"]);
    let a = agent();
    let rides = random_rides(3, 200, 30);
    for r in &rides {
        assert_eq!(r.post(&a, &s.base), 201);
    }
    assert_eq!(s.terminate(), Some(0));
    s.restart();
    let (_, body) = call(&a, "GET", &s.url("/admin/wal"), &[], None);
    // The final flush wrote everything: nothing left to replay.
    assert_eq!(json(&body)["recovery"]["records"], 0, "{body}");
    let bad = Expected::from(&rides).check(&a, &s.base);
    assert!(bad.is_empty(), "{:?}", &bad[..bad.len().min(5)]);
}

#[test]
fn every_config_key_reaches_the_node_through_its_environment_variable() {
    // The previous release ignored LIFTLOG_MAX_BODY_BYTES (about 20 keys had no variable);
    // now the sectioned name and, for one release, the flat name both reach the node.
    let a = agent();
    let body = format!(r#"{{"time":10,"liftID":5,"pad":"{}"}}"#, "x".repeat(120));
    for var in ["LIFTLOG_HTTP__MAX_BODY_BYTES", "LIFTLOG_MAX_BODY_BYTES"] {
        let dir = tempfile::tempdir().unwrap();
        let s = Server::start_with_env(dir.path(), &[], &[(var, "100")]);
        let (code, msg) = call(&a, "POST", &s.url("/skiers/1/seasons/2025/days/1/skiers/7"), &[JSON], Some(&body));
        assert_eq!(code, 413, "{var}=100 must refuse a {}-byte body: {msg}", body.len());
        let (code, _) = call(&a, "POST", &s.url("/skiers/1/seasons/2025/days/1/skiers/7"), &[JSON], Some(r#"{"time":10,"liftID":5}"#));
        assert_eq!(code, 201, "a small body still passes under {var}=100");
    }
    // A misspelt key is refused at start, naming the variable.
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_liftlog"))
        .args(["serve", "--listen", "127.0.0.1:0", "--admin-listen", "main", "--data-dir"])
        .arg(dir.path())
        .env("LIFTLOG_HTTP__MAX_BODY_BYTE", "100")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("LIFTLOG_HTTP__MAX_BODY_BYTE"), "{err}");
}

#[test]
fn admin_routes_open_beyond_loopback_are_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_liftlog"))
        .args(["serve", "--listen", "0.0.0.0:0", "--admin-listen", "main", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success(), "admin on a public listener without a token must not start");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("admin.token"), "{err}");
}

#[test]
fn a_keep_alive_client_dripping_its_next_head_is_cut_off() {
    // actix-http times the first request head of a connection only; a client that completes
    // one request and then drips the next head used to hold its connection for good.
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path(), &["--set", "http.client_request_timeout_ms=1000"]);
    let addr = s.base.trim_start_matches("http://").to_string();
    let mut c = std::net::TcpStream::connect(&addr).unwrap();
    c.set_read_timeout(Some(std::time::Duration::from_millis(100))).unwrap();
    c.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut buf = [0u8; 1024];
    let started = std::time::Instant::now();
    let mut got = Vec::new();
    while !String::from_utf8_lossy(&got).contains("\"ok\"") {
        match c.read(&mut buf) {
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(_) => assert!(started.elapsed().as_secs() < 10, "no answer to the first request"),
        }
    }
    assert!(String::from_utf8_lossy(&got).starts_with("HTTP/1.1 200"), "{}", String::from_utf8_lossy(&got));
    // The next head, a byte every 200 ms, for at most 15 s: the node must close first.
    let dripping = std::time::Instant::now();
    let mut closed = false;
    for b in b"GET /health HTTP/1.1\r\nHost: x\r\nX-Pad: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
        .iter()
        .cycle()
        .take(75)
    {
        if c.write_all(&[*b]).is_err() {
            closed = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
        match c.read(&mut buf) {
            Ok(0) => {
                closed = true;
                break;
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => {
                closed = true;
                break;
            }
        }
    }
    assert!(closed, "the dripping connection was still open after {:?}", dripping.elapsed());
    assert!(dripping.elapsed() < std::time::Duration::from_secs(10), "closed only after {:?}", dripping.elapsed());
    // Everyone else is served meanwhile and after.
    assert_eq!(get(&agent(), &s.url("/health")).0, 200);
}

/// Issue 13, item 4: the season index is a bounded cache, not a copy of every skier built
/// by a full scan at each start. After a restart it holds nothing until asked; answers for
/// skiers it does not hold are computed exactly (resident days + tables), and it never
/// holds more pairs than `actors.season_index_entries`, however many skiers there are.
#[test]
fn season_totals_stay_exact_with_a_bounded_index_and_no_scan_at_restart() {
    let dir = tempfile::tempdir().unwrap();
    let args = ["--set", "actors.season_index_entries=64", "--set", "flush.interval_ms=50"];
    let mut s = Server::start(dir.path(), &args);
    let a = agent();
    let rides = random_rides(4_004, 1_500, 500);
    for r in &rides[..1_000] {
        assert_eq!(r.post(&a, &s.base), 201);
    }
    let held = |s: &Server| json(&call(&a, "GET", &s.url("/admin/actors"), &[], None).1)["season_index_skiers"].as_u64().unwrap();
    // Reading every skier's totals (500 skiers × 3 resorts) goes through the bound.
    let bad = Expected::from(&rides[..1_000]).check(&a, &s.base);
    assert!(bad.is_empty(), "{} mismatches, e.g. {:?}", bad.len(), &bad[..bad.len().min(5)]);
    assert!(held(&s) <= 64, "the index holds {} pairs past its bound of 64", held(&s));
    // The flusher's own figure: everything in the tables before the restart.
    let checkpoint = || json(&call(&a, "GET", &s.url("/admin/wal"), &[], None).1)["flusher"]["checkpoint"].as_u64().unwrap_or(0);
    let dispatched = json(&call(&a, "GET", &s.url("/admin/wal"), &[], None).1)["consumer"]["dispatched_seq"].as_u64().unwrap();
    common::wait_for("the checkpoint covering every ride", std::time::Duration::from_secs(30), || checkpoint() >= dispatched);
    s.terminate();
    s.restart();
    assert_eq!(held(&s), 0, "no full scan at start: the index is empty until asked");
    // Cached pairs stay exact as new rides come: read, post more, read again.
    let bad = Expected::from(&rides[..1_000]).check(&a, &s.base);
    assert!(bad.is_empty(), "after the restart: {:?}", &bad[..bad.len().min(5)]);
    for r in &rides[1_000..] {
        assert_eq!(r.post(&a, &s.base), 201);
    }
    let bad = Expected::from(&rides).check(&a, &s.base);
    assert!(bad.is_empty(), "after more rides: {} mismatches, e.g. {:?}", bad.len(), &bad[..bad.len().min(5)]);
    assert!(held(&s) <= 64);
}

/// Issue 13, item 8: each distinct `resort=` is a table query, so their number is bounded
/// (repeats included, checked before any query) with a 400 that says the bound.
#[test]
fn season_vertical_refuses_more_resort_parameters_than_the_bound() {
    // Each distinct resort is one table query: at most 16 per request. A catalog of 20
    // resorts, so that the bound can be passed with real ones; repeats stay legal.
    let dir = tempfile::tempdir().unwrap();
    let catalog = dir.path().join("catalog.toml");
    let resorts: String = (1..=20).map(|i| format!("[[resorts]]\nid = {i}\nname = \"Resort {i}\"\nlift_count = 40\n")).collect();
    std::fs::write(&catalog, resorts).unwrap();
    let s = InProcess::start(&dir.path().join("data"), &["--set", &format!("catalog={}", catalog.display())]);
    let a = agent();
    assert_eq!(call(&a, "POST", &s.url("/skiers/1/seasons/2025/days/1/skiers/7"), &[JSON], Some(r#"{"time":10,"liftID":5}"#)).0, 201);
    let query =
        |resorts: &[u32]| format!("/skiers/7/vertical?{}", resorts.iter().map(|r| format!("resort={r}")).collect::<Vec<_>>().join("&"));
    let sixteen: Vec<u32> = (1..=16).collect();
    let (code, body) = get(&a, &s.url(&query(&sixteen)));
    assert_eq!((code, json(&body)), (200, json(r#"{"resorts":[{"seasonID":"2025","totalVert":50}]}"#)));
    let (code, body) = get(&a, &s.url(&query(&[1; 200])));
    assert_eq!(code, 200, "repeats of one resort are one query: {body}");
    let seventeen: Vec<u32> = (1..=17).collect();
    let (code, body) = get(&a, &s.url(&query(&seventeen)));
    assert_eq!(code, 400, "{body}");
    assert!(json(&body)["message"].as_str().unwrap().contains("at most 16 distinct resort"), "{body}");
}

/// A stand-in OpenTelemetry collector: accepts OTLP/HTTP POSTs on a loopback port (keep-alive
/// or not), answers 200 with an empty protobuf body, and keeps every request body.
#[cfg(feature = "otlp")]
fn otlp_collector() -> (std::net::SocketAddr, std::sync::Arc<std::sync::Mutex<Vec<u8>>>) {
    use std::io::{BufRead, BufReader, Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let received = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = received.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let sink = sink.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(conn.try_clone().unwrap());
                let mut conn = conn;
                loop {
                    let (mut line, mut length) = (String::new(), 0usize);
                    loop {
                        line.clear();
                        if reader.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        if line == "\r\n" {
                            break;
                        }
                        if let Some((k, v)) = line.split_once(':') {
                            if k.eq_ignore_ascii_case("content-length") {
                                length = v.trim().parse().unwrap_or(0);
                            }
                        }
                    }
                    let mut body = vec![0; length];
                    if reader.read_exact(&mut body).is_err() {
                        return;
                    }
                    sink.lock().unwrap().extend_from_slice(&body);
                    let answer = "HTTP/1.1 200 OK\r\nContent-Type: application/x-protobuf\r\nContent-Length: 0\r\n\r\n";
                    if conn.write_all(answer.as_bytes()).is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, received)
}

/// With `log.otlp_endpoint`, a request's span reaches the collector, in the client's trace
/// (the `traceparent`'s trace id) and with its request id; the spans still batched when the
/// node gets SIGTERM are sent before it exits.
#[cfg(feature = "otlp")]
#[test]
fn request_spans_reach_an_otlp_collector_in_the_clients_trace() {
    let (collector, received) = otlp_collector();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("node.log");
    let endpoint = format!("log.otlp_endpoint=http://{collector}");
    let mut s = Server::start_logged(&dir.path().join("data"), &["--set", &endpoint], &[], Some((&log, "info")));
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let traceparent = format!("00-{trace_id}-00f067aa0ba902b7-01");
    let headers = [JSON, ("traceparent", traceparent.as_str()), ("X-Request-Id", "otlp-probe-7")];
    let (code, _) = call(&agent(), "POST", &s.url("/skiers/1/seasons/2025/days/1/skiers/7"), &headers, Some(r#"{"time":10,"liftID":5}"#));
    assert_eq!(code, 201);
    assert_eq!(s.terminate(), Some(0), "clean exit; log: {}", std::fs::read_to_string(&log).unwrap_or_default());
    let body = received.lock().unwrap().clone();
    let has = |needle: &[u8]| body.windows(needle.len()).any(|w| w == needle);
    let trace_bytes: Vec<u8> = (0..16).map(|i| u8::from_str_radix(&trace_id[2 * i..2 * i + 2], 16).unwrap()).collect();
    assert!(!body.is_empty(), "the collector received nothing");
    assert!(has(b"otlp-probe-7"), "the request id is a span attribute");
    assert!(has(&trace_bytes), "the span is in the client's trace");
    assert!(has(b"service.name") && has(b"liftlog"), "the service name is in the resource");
}

#[test]
fn the_live_stream_follows_the_day_resumes_by_event_id_and_is_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Server::start(dir.path(), &["--set", "http.max_streams=2"]);
    let a = agent();
    let day = "/resorts/2/seasons/2025/day/200";
    let stream = s.url(&format!("{day}/stream"));
    let mut first = Sse::open(&stream, None).unwrap();
    let (id, empty) = first.next_day();
    assert_eq!((id, &empty["numSkiers"], &empty["rides"]), (0, &Value::from(0), &Value::from(0)), "a day without rides: {empty}");

    // Five rides of three skiers; the stream reaches exactly them (coalesced: maybe in one event).
    let ride = |skier: u32, time: u16, lift: u16, key: &str| {
        let r = common::Ride { at: liftlog::domain::DayKey { resort: 2, season: 2025, day: 200 }, skier, time, lift, key: key.into() };
        assert_eq!(r.post(&a, &s.base), 201);
    };
    for (i, (skier, time, lift)) in [(7, 10, 5), (7, 20, 6), (8, 30, 5), (9, 200, 40), (8, 31, 5)].into_iter().enumerate() {
        ride(skier, time, lift, &format!("k{i}"));
    }
    ride(7, 10, 5, "k0"); // a retry: no change
    let (id, five) = first.until("5 rides", |id, _| id == 5);
    assert_eq!(five["numSkiers"], 3, "{five}");
    // The default catalog: lift n rises n × 10 m. Skier 9: 400; skier 8: 100; skier 7: 110.
    let leaders: Vec<(u64, u64)> =
        five["leaders"].as_array().unwrap().iter().map(|l| (l["skierID"].as_u64().unwrap(), l["vertical"].as_u64().unwrap())).collect();
    assert_eq!(leaders, [(9, 400), (7, 110), (8, 100)], "{five}");
    let lifts: Vec<(u64, u64)> = five["activity"]["lifts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| (l["liftID"].as_u64().unwrap(), l["rides"].as_u64().unwrap()))
        .collect();
    assert_eq!(lifts, [(5, 3), (6, 1), (40, 1)], "{five}");
    assert_eq!(five["activity"]["lifts"][0]["buckets"][1], 1, "time 20 is in the second 15-minute bucket");

    // A viewer that resumes with the id it has gets nothing until the day changes, then the change.
    let mut resumed = Sse::open(&stream, Some(id)).unwrap();
    ride(10, 100, 1, "k5");
    let (id6, six) = resumed.next_day();
    assert_eq!((id6, &six["rides"], &six["numSkiers"]), (6, &Value::from(6), &Value::from(4)), "{six}");

    // Two viewers of one day share one feed; a third viewer is refused with a reason.
    let (_, stats) = call(&a, "GET", &s.url("/admin/actors"), &[], None);
    let live = &json(&stats)["live"];
    assert_eq!((&live["viewers"], &live["feeds"], &live["max_viewers"]), (&Value::from(2), &Value::from(1), &Value::from(2)), "{live}");
    match Sse::open(&s.url("/resorts/1/seasons/2025/day/1/stream"), None) {
        Err((code, body, retry)) => {
            assert_eq!(code, 503, "{body}");
            assert!(body.contains("at most 2 live streams"), "{body}");
            assert_eq!(retry.as_deref(), Some("5"));
        }
        Ok(_) => panic!("a third stream past http.max_streams=2 was served"),
    }
    // A viewer that leaves gives its place back (noticed when the next change is written).
    drop(resumed);
    ride(11, 100, 1, "k6");
    common::wait_for("the closed stream's place", std::time::Duration::from_secs(30), || {
        json(&call(&a, "GET", &s.url("/admin/actors"), &[], None).1)["live"]["viewers"] == 1
    });
    let mut again = Sse::open(&stream, Some(3)).unwrap();
    let (id7, _) = again.next_day();
    assert_eq!(id7, 7, "a stale Last-Event-ID gets the current summary at once");
    assert_eq!(first.until("7 rides", |id, _| id == 7).1["numSkiers"], 5);

    // Bad requests are answered before any stream starts.
    drop(first);
    drop(again);
    let mut nudges = 0;
    common::wait_for("every stream closed", std::time::Duration::from_secs(30), || {
        nudges += 1;
        ride(12, 1, 1, &format!("nudge-{nudges}"));
        json(&call(&a, "GET", &s.url("/admin/actors"), &[], None).1)["live"]["viewers"] == 0
    });
    assert_eq!(get(&a, &s.url("/resorts/999/seasons/2025/day/1/stream")).0, 404);
    assert_eq!(get(&a, &s.url("/resorts/1/seasons/2025/day/0/stream")).0, 400);

    // Shutdown ends the open streams rather than waiting on them: the graceful stop's own
    // timeout (30 s) is what it took before they were closed first.
    let mut open = Sse::open(&stream, None).unwrap();
    let _ = open.next_day();
    let stopping = std::time::Instant::now();
    assert_eq!(s.terminate(), Some(0));
    assert!(stopping.elapsed() < std::time::Duration::from_secs(20), "shutdown waited {:?} on a stream", stopping.elapsed());
    assert!(open.ended(), "the stream ends with the node");
}
