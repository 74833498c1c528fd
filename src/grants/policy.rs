//! The approver policy: who may approve a grant for an environment, how recently they must have
//! signed in, and how.
//!
//! Guarantees:
//! - With a fresh sign-in required, an approval without `auth_time`, with an `auth_time` older
//!   than the environment's limit, or with one in the future (beyond the clock skew) is denied.
//! - An email allowlist matches only an email the provider marks verified ([`Approver::email`]
//!   holds nothing else); subjects and groups match exactly.
//! - Every denial says why, naming what the provider did or did not send.

use crate::clock::UnixSeconds;
use crate::environments::{LoginFreshness, Policy, RequesterRule};
use crate::oidc::{Approver, CLOCK_SKEW_SECONDS};

/// Whether `approver` may approve under `policy` at time `now`; the error is the denial reason.
pub fn check_approver(
    policy: &Policy,
    approver: &Approver,
    now: UnixSeconds,
) -> Result<(), String> {
    if policy.freshness == LoginFreshness::Required {
        check_fresh(policy.max_auth_age_seconds, approver.auth_time, now)?;
    }
    if !policy.accepted_acr.is_empty()
        && !approver
            .acr
            .as_ref()
            .is_some_and(|acr| policy.accepted_acr.contains(acr))
    {
        return Err(format!(
            "the approver's sign-in level (acr) is not one of: {}",
            policy.accepted_acr.join(", ")
        ));
    }
    if let Some(missing) = policy
        .required_amr
        .iter()
        .find(|m| !approver.amr.contains(m))
    {
        return Err(format!(
            "the approver's sign-in did not use the required method `{missing}` (amr)"
        ));
    }
    check_allowed(policy, approver)
}

/// Whether `approver` may approve a grant that `requester` (the IdP subject of the engineer who
/// asked; `None` for an agent token) asked for, under the environment's requester rule. A grant
/// without a requester cannot be approved under `requester` or `not_requester` (such requests are
/// refused up front; this holds for rows stored before that).
pub fn check_requester(
    rule: RequesterRule,
    requester: Option<&str>,
    approver: &Approver,
) -> Result<(), String> {
    match (rule, requester) {
        (RequesterRule::Any, _) => Ok(()),
        (RequesterRule::Requester, Some(r)) if r == approver.subject => Ok(()),
        (RequesterRule::Requester, _) => Err(
            "this environment requires the engineer who asked to approve their own grant, and the approver is someone else"
                .to_owned(),
        ),
        (RequesterRule::NotRequester, Some(r)) if r == approver.subject => Err(
            "this environment requires someone other than the engineer who asked to approve (four eyes)"
                .to_owned(),
        ),
        (RequesterRule::NotRequester, Some(_)) => Ok(()),
        (RequesterRule::NotRequester, None) => Err(
            "this environment requires someone other than the engineer who asked to approve (four eyes), and an agent token names no engineer"
                .to_owned(),
        ),
    }
}

fn check_fresh(
    max_age: i64,
    auth_time: Option<UnixSeconds>,
    now: UnixSeconds,
) -> Result<(), String> {
    match auth_time {
        None => Err(format!(
            "the identity provider did not say when the approver signed in (auth_time), although Custodian asked with max_age={max_age}; this environment requires a fresh sign-in"
        )),
        Some(at) if at > now + CLOCK_SKEW_SECONDS => Err(format!(
            "the identity provider says the approver signed in {} s in the future (auth_time); that is not a fresh sign-in",
            at - now
        )),
        Some(at) if now - at > max_age => Err(format!(
            "the approver signed in {} s before approving; this environment requires a sign-in within {max_age} s",
            now - at
        )),
        Some(_) => Ok(()),
    }
}

fn check_allowed(policy: &Policy, approver: &Approver) -> Result<(), String> {
    let list = &policy.approvers;
    if list.subjects.is_empty() && list.emails.is_empty() && list.groups.is_empty() {
        return Ok(());
    }
    let allowed = list.subjects.contains(&approver.subject)
        || approver
            .email
            .as_ref()
            .is_some_and(|e| list.emails.iter().any(|a| a.eq_ignore_ascii_case(e)))
        || approver.groups.iter().any(|g| list.groups.contains(g));
    if allowed {
        return Ok(());
    }
    let who = approver.name.as_deref().unwrap_or(&approver.subject);
    let mut reason = format!("{who} is not allowed to approve grants for this environment");
    if !list.emails.is_empty() && approver.email.is_none() {
        reason.push_str(
            "; the identity provider sent no verified email for them (email_verified must be true)",
        );
    }
    if !list.groups.is_empty() && approver.groups.is_empty() {
        reason.push_str("; the identity provider sent no groups for them");
    }
    Err(reason)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requester_rules_compare_idp_subjects() {
        let alice = approver();
        let mut bob = approver();
        bob.subject = "bob".into();
        let any = RequesterRule::Any;
        let own = RequesterRule::Requester;
        let other = RequesterRule::NotRequester;
        assert_eq!(check_requester(any, Some("alice"), &alice), Ok(()));
        assert_eq!(check_requester(own, Some("alice"), &alice), Ok(()));
        assert!(check_requester(own, Some("alice"), &bob).is_err());
        assert!(check_requester(own, None, &alice).is_err());
        assert!(
            check_requester(other, Some("alice"), &alice)
                .unwrap_err()
                .contains("four eyes")
        );
        assert_eq!(check_requester(other, Some("alice"), &bob), Ok(()));
        assert!(check_requester(other, None, &alice).is_err());
    }
    use crate::environments::Approvers;

    fn approver() -> Approver {
        Approver {
            subject: "alice".into(),
            name: Some("alice@example.com".into()),
            email: Some("alice@example.com".into()),
            groups: vec!["platform".into()],
            auth_time: Some(1000),
            acr: Some("mfa".into()),
            amr: vec!["pwd".into(), "otp".into()],
        }
    }

    #[test]
    fn freshness_needs_a_recent_auth_time_that_is_not_in_the_future() {
        let mut policy = Policy::default();
        assert_eq!(check_approver(&policy, &approver(), 1100), Ok(()));
        let stale = check_approver(&policy, &approver(), 1000 + 301).unwrap_err();
        assert!(stale.contains("within 300 s"), "{stale}");
        // Within the clock skew of the IdP's clock: fine; beyond it: not fresh.
        assert_eq!(check_approver(&policy, &approver(), 1000 - 30), Ok(()));
        let future = check_approver(&policy, &approver(), 1000 - 61).unwrap_err();
        assert!(future.contains("in the future"), "{future}");
        let mut no_time = approver();
        no_time.auth_time = None;
        let missing = check_approver(&policy, &no_time, 1100).unwrap_err();
        assert!(missing.contains("max_age=300"), "{missing}");
        policy.freshness = LoginFreshness::NotRequired;
        assert_eq!(check_approver(&policy, &no_time, 999_999), Ok(()));
    }

    #[test]
    fn allowlists_match_subjects_verified_emails_and_groups() {
        let mut policy = Policy {
            approvers: Approvers {
                subjects: vec![],
                emails: vec!["ALICE@example.com".into()],
                groups: vec![],
            },
            ..Policy::default()
        };
        assert_eq!(check_approver(&policy, &approver(), 1100), Ok(()));
        // An unverified email never reaches `email`; the name still shows what was claimed.
        let unverified = Approver {
            subject: "eve".into(),
            name: Some("alice@example.com (unverified)".into()),
            email: None,
            groups: vec![],
            ..approver()
        };
        let refused = check_approver(&policy, &unverified, 1100).unwrap_err();
        assert_eq!(
            refused,
            "alice@example.com (unverified) is not allowed to approve grants for this environment; the identity provider sent no verified email for them (email_verified must be true)"
        );
        policy.approvers = Approvers {
            subjects: vec![],
            emails: vec![],
            groups: vec!["sre".into()],
        };
        let refused = check_approver(&policy, &approver(), 1100).unwrap_err();
        assert_eq!(
            refused,
            "alice@example.com is not allowed to approve grants for this environment"
        );
        let no_groups = Approver {
            groups: vec![],
            ..approver()
        };
        assert!(
            check_approver(&policy, &no_groups, 1100)
                .unwrap_err()
                .ends_with("sent no groups for them")
        );
        policy.approvers.groups.push("platform".into());
        assert_eq!(check_approver(&policy, &approver(), 1100), Ok(()));
        policy.approvers = Approvers {
            subjects: vec!["alice".into()],
            emails: vec![],
            groups: vec![],
        };
        assert_eq!(check_approver(&policy, &no_groups, 1100), Ok(()));
    }

    #[test]
    fn acr_and_amr_requirements_are_enforced() {
        let mut policy = Policy {
            accepted_acr: vec!["phr".into()],
            ..Policy::default()
        };
        assert!(
            check_approver(&policy, &approver(), 1100)
                .unwrap_err()
                .contains("acr")
        );
        policy.accepted_acr = vec!["mfa".into()];
        assert_eq!(check_approver(&policy, &approver(), 1100), Ok(()));
        policy.required_amr = vec!["hwk".into()];
        assert!(
            check_approver(&policy, &approver(), 1100)
                .unwrap_err()
                .contains("`hwk`")
        );
    }
}
