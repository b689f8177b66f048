//! Every error a run returns chains, through `source()`, down to the error the user's code
//! returned, so a caller can downcast it or print the whole chain.

use std::error::Error as StdError;
use std::fmt;

use flowline::prelude::*;

/// The user's own error type, to find again at the end of the chain.
#[derive(Debug)]
struct NotFound(u32);

impl fmt::Display for NotFound {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "user {} not found", self.0)
    }
}

impl StdError for NotFound {}

/// Each error of the chain, from `e` down, as its `Display` text.
fn chain(e: &(dyn StdError + 'static)) -> Vec<String> {
    let mut out = vec![e.to_string()];
    let mut next = e.source();
    while let Some(s) = next {
        out.push(s.to_string());
        next = s.source();
    }
    out
}

/// The last error of the chain (the root cause).
fn root<'a>(e: &'a (dyn StdError + 'static)) -> &'a (dyn StdError + 'static) {
    let mut e = e;
    while let Some(s) = e.source() {
        e = s;
    }
    e
}

#[test]
fn item_error_user_has_the_users_error_as_source() {
    let e = ItemError::user(NotFound(7));
    let source = e.source().expect("a user error has a source");
    assert_eq!(source.downcast_ref::<NotFound>().unwrap().0, 7);
    assert!(source.source().is_none());
}

#[test]
fn item_errors_made_by_flowline_have_no_source() {
    let errors = [
        ItemError::Timeout(std::time::Duration::from_secs(1)),
        ItemError::Panic("boom".into()),
        ItemError::CircuitOpen,
    ];
    for e in errors {
        assert!(e.source().is_none(), "{e}");
    }
}

#[test]
fn failure_is_an_error_whose_source_is_its_item_error() {
    let f = Failure::new("fetch", ItemError::user(NotFound(3)), 2);
    let source = f.source().expect("a failure has a source");
    assert!(matches!(
        source.downcast_ref::<ItemError>(),
        Some(ItemError::User(_))
    ));
    assert_eq!(
        chain(&f),
        [
            "stage `fetch` failed after 2 attempt(s): user 3 not found",
            "user 3 not found",
            "user 3 not found",
        ]
    );
    assert_eq!(root(&f).downcast_ref::<NotFound>().unwrap().0, 3);
}

#[tokio::test(flavor = "current_thread")]
async fn item_failed_chains_to_the_failure_and_the_users_error() {
    let err = Pipeline::from_iter(1..=10u32)
        .try_map_async("fetch", |id| async move {
            if id == 4 { Err(NotFound(id)) } else { Ok(id) }
        })
        .run()
        .error_policy(ErrorPolicy::Stop)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::ItemFailed { .. }));
    let failure = err.source().expect("ItemFailed has a source");
    assert_eq!(&*failure.downcast_ref::<Failure>().unwrap().stage, "fetch");
    let item = failure.source().expect("a failure has a source");
    assert!(item.downcast_ref::<ItemError>().is_some());
    assert_eq!(root(&err).downcast_ref::<NotFound>().unwrap().0, 4);
    assert_eq!(chain(&err).len(), 4);
}

#[tokio::test(flavor = "current_thread")]
async fn source_error_chains_to_the_item_error_and_the_users_error() {
    let mut page = 0;
    let err = Pipeline::try_from_fn(move || {
        page += 1;
        let p = page;
        async move { if p < 3 { Ok(Some(p)) } else { Err(NotFound(p)) } }
    })
    .run()
    .await
    .unwrap_err();
    assert!(matches!(err, Error::Source { .. }));
    let item = err.source().expect("Source has a source");
    assert!(matches!(
        item.downcast_ref::<ItemError>(),
        Some(ItemError::User(_))
    ));
    assert_eq!(root(&err).downcast_ref::<NotFound>().unwrap().0, 3);
    assert_eq!(chain(&err).len(), 3);
}
