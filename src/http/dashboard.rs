//! `GET /dashboard`: the live view's page (issue 14), served by liftlog itself.
//!
//! One self-contained HTML file (`dashboard.html`: inline CSS and script, no external
//! asset, no build step), compiled into the binary. It reads only the public API — the
//! resort list, a resort's seasons, and the day's stream ([`super::stream`]) — so it works
//! on every node and mode, and through any proxy that passes the API. With an admin token
//! typed in, it also shows an operations panel from `/admin/wal` and `/admin/actors`
//! (where those are served on the same listener, `admin.listen = "main"`).
//!
//! The page is static, so a CDN may keep it: `public, max-age=300` with a strong-enough
//! ETag (the bytes' hash) for revalidation. The figures on it never go through that cache:
//! they arrive on the stream, which is `no-store`.

use actix_web::{http::header, HttpRequest, HttpResponse};
use std::sync::LazyLock;

const PAGE: &str = include_str!("dashboard.html");

/// The page's ETag, in the weak form every other liftlog ETag has.
static ETAG: LazyLock<String> = LazyLock::new(|| super::weak_etag(PAGE.as_bytes()));

pub async fn page(req: HttpRequest) -> HttpResponse {
    let etag = ETAG.as_str();
    if let Some(not_modified) = super::not_modified(&req, etag) {
        return not_modified;
    }
    HttpResponse::Ok()
        .content_type("text/html; charset=utf-8")
        .insert_header((header::ETAG, etag))
        .insert_header((header::CACHE_CONTROL, "public, max-age=300"))
        .body(PAGE)
}
