//! A PostgreSQL database of its own for each test that needs one.

/// A fresh, empty database on the PostgreSQL server named by `AIPIPE_TEST_POSTGRES_URL`
/// (`.ci/run` starts one and always sets it), so that tests running at once never share rows.
/// `None`, with a note on stderr, when the variable is not set outside CI.
///
/// # Panics
/// If the variable is set but the server cannot be used, or not set while `CI` is: a test
/// that was meant to have a database must not pass silently without one.
#[allow(clippy::expect_used, clippy::panic)]
pub async fn fresh_postgres() -> Option<String> {
    let Ok(url) = std::env::var("AIPIPE_TEST_POSTGRES_URL") else {
        if std::env::var_os("CI").is_some() {
            panic!("CI is set but AIPIPE_TEST_POSTGRES_URL is not: start a server with `.ci/postgres start DIR`");
        }
        eprintln!("AIPIPE_TEST_POSTGRES_URL is not set: the PostgreSQL half of this test is skipped");
        return None;
    };
    sqlx::any::install_default_drivers();
    let admin = sqlx::AnyPool::connect(&url).await.expect("AIPIPE_TEST_POSTGRES_URL does not accept connections");
    let name = format!("aipipe_test_{}", uuid::Uuid::new_v4().simple());
    // The name is ours (a UUID), not input.
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&admin)
        .await
        .expect("the test server refused to create a database");
    admin.close().await;
    let (server, _) = url.rsplit_once('/').expect("AIPIPE_TEST_POSTGRES_URL ends in /DATABASE");
    Some(format!("{server}/{name}"))
}
