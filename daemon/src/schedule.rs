//! When to refresh, and how long to wait after a failure. Pure arithmetic
//! on Unix milliseconds, so every rule is tested without a clock.

/// The timing policy, from the configuration.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// Refresh once this fraction of the lifetime has passed...
    pub refresh_at: f64,
    /// ...but no later than this long before expiry, where the lifetime
    /// allows it.
    pub min_lead_ms: u64,
    /// Largest random shift towards earlier.
    pub max_jitter_ms: u64,
    /// Shortest gap between two scheduled refreshes.
    pub min_gap_ms: u64,
    /// Lifetime assumed when nothing says otherwise.
    pub default_lifetime_ms: u64,
    pub backoff_base_ms: u64,
    pub backoff_max_ms: u64,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            refresh_at: 0.8,
            min_lead_ms: 60_000,
            max_jitter_ms: 10_000,
            min_gap_ms: 30_000,
            default_lifetime_ms: 300_000,
            backoff_base_ms: 1_000,
            backoff_max_ms: 60_000,
        }
    }
}

impl Timing {
    /// The point in a lifetime `[start, end)` at which to refresh: at the
    /// configured fraction, pulled earlier to keep `min_lead` before the end,
    /// but never earlier than half the lifetime, so a short-lived token is
    /// not refreshed the moment it arrives.
    fn refresh_point(&self, start: u64, end: u64) -> u64 {
        let lifetime = end.saturating_sub(start);
        // Saturating: a lifetime near u64::MAX (a provider stating an
        // absurd one) means a refresh far off, never one wrapped into the past.
        let at_fraction = start.saturating_add((lifetime as f64 * self.refresh_at) as u64);
        let with_lead = end.saturating_sub(self.min_lead_ms);
        at_fraction.min(with_lead.max(start.saturating_add(lifetime / 2)))
    }

    /// When a session that obtained its tokens at `obtained` should refresh.
    ///
    /// Both deadlines count: the access token's, and the refresh token's own
    /// when the provider gives one (Keycloak's `refresh_expires_in`), since a
    /// refresh token that lapses first ends the session. `jitter` is a
    /// random number in `[0, 1)` that moves the time earlier by up to
    /// `max_jitter` or a twentieth of the lifetime, whichever is smaller.
    pub fn next_refresh(
        &self,
        obtained: u64,
        access_expires: u64,
        refresh_expires: Option<u64>,
        jitter: f64,
    ) -> u64 {
        let mut due = self.refresh_point(obtained, access_expires);
        if let Some(refresh_expires) = refresh_expires {
            due = due.min(self.refresh_point(obtained, refresh_expires));
        }

        // The shorter of the two lifetimes bounds how much the time may move.
        let end = refresh_expires.map_or(access_expires, |r| r.min(access_expires));
        let lifetime = end.saturating_sub(obtained);
        let jitter_span = self.max_jitter_ms.min(lifetime / 20);
        due = due.saturating_sub((jitter_span as f64 * jitter) as u64);

        // The gap keeps a loop from forming when lifetimes are tiny; it is
        // capped at half the lifetime so a real short lifetime still works.
        let gap = self.min_gap_ms.min(lifetime / 2);
        due.max(obtained.saturating_add(gap))
    }

    /// How long to wait before attempt number `failures + 1`, after
    /// `failures` passing failures in a row: exponential from the base,
    /// capped, with jitter taking up to half of it away so that sessions
    /// failing together spread out. A provider's `Retry-After` is a floor.
    pub fn backoff_ms(&self, failures: u32, retry_after_ms: Option<u64>, jitter: f64) -> u64 {
        let exponent = failures.saturating_sub(1).min(32);
        let full = self
            .backoff_base_ms
            .saturating_mul(1u64 << exponent)
            .min(self.backoff_max_ms);
        let delay = full - (full as f64 * 0.5 * jitter) as u64;
        delay.max(retry_after_ms.unwrap_or(0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000;

    fn timing() -> Timing {
        Timing {
            max_jitter_ms: 0,
            ..Timing::default()
        }
    }

    #[test]
    fn long_lifetimes_refresh_at_eighty_percent() {
        // One hour: 80% is 48 minutes, earlier than 59 minutes.
        assert_eq!(timing().next_refresh(0, 3600 * S, None, 0.0), 2880 * S);
    }

    #[test]
    fn medium_lifetimes_keep_a_minute_of_lead() {
        // Ten minutes: 80% is 8 min, but the 60 s lead asks for 9 min; the
        // earlier one wins. Four minutes: 80% is 192 s, lead says 180 s.
        assert_eq!(timing().next_refresh(0, 600 * S, None, 0.0), 480 * S);
        assert_eq!(timing().next_refresh(0, 240 * S, None, 0.0), 180 * S);
    }

    #[test]
    fn short_lifetimes_refresh_no_earlier_than_half_way() {
        // Five seconds: the lead cannot be kept; half way is the floor.
        let due = timing().next_refresh(0, 5 * S, None, 0.0);
        assert_eq!(due, 2500);
        // Ninety seconds: the lead would say 30 s; half way is 45 s.
        assert_eq!(timing().next_refresh(0, 90 * S, None, 0.0), 45 * S);
    }

    #[test]
    fn refresh_is_scheduled_before_short_refresh_token_expiry() {
        // Keycloak short idle: access 300 s, refresh token 120 s.
        let due = timing().next_refresh(0, 300 * S, Some(120 * S), 0.0);
        assert_eq!(due, 60 * S);
    }

    #[test]
    fn a_shrinking_refresh_token_lifetime_pulls_the_refresh_earlier() {
        let t = timing();
        let mut previous = u64::MAX;
        for remaining in [1800, 900, 240, 60] {
            let due = t.next_refresh(0, 300 * S, Some(remaining * S), 0.0);
            assert!(
                due < remaining * S,
                "due {due} after the refresh token dies"
            );
            assert!(due <= previous);
            previous = due;
        }
    }

    #[test]
    fn jitter_only_moves_earlier_and_stays_small() {
        let t = Timing::default();
        let plain = t.next_refresh(0, 3600 * S, None, 0.0);
        let jittered = t.next_refresh(0, 3600 * S, None, 0.999);
        assert!(jittered < plain);
        assert!(plain - jittered <= t.max_jitter_ms);
    }

    #[test]
    fn the_minimum_gap_stops_tiny_lifetimes_from_looping() {
        let t = timing();
        // A provider claiming one second still gets half a second of gap,
        // and a normal lifetime is never refreshed within 30 s.
        assert!(t.next_refresh(10_000, 11_000, None, 0.0) >= 10_500);
        let gapped = Timing {
            refresh_at: 0.1,
            ..t
        };
        assert_eq!(gapped.next_refresh(0, 200 * S, None, 0.0), 30 * S);
        // The gap never pushes past a short refresh-token deadline.
        assert!(t.next_refresh(0, 300 * S, Some(10 * S), 0.0) < 10 * S);
    }

    #[test]
    fn backoff_grows_to_its_cap_and_honours_retry_after() {
        let t = timing();
        let delays: Vec<u64> = (1..=10).map(|n| t.backoff_ms(n, None, 0.0)).collect();
        assert_eq!(&delays[..4], &[1_000, 2_000, 4_000, 8_000]);
        assert_eq!(delays[9], 60_000);
        assert!(delays.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(t.backoff_ms(1, Some(120_000), 0.0), 120_000);
        assert_eq!(t.backoff_ms(100, None, 0.0), 60_000);
    }

    #[test]
    fn backoff_jitter_spreads_within_half() {
        let t = timing();
        let jittered = t.backoff_ms(10, None, 0.999);
        assert!((30_000..60_000).contains(&jittered));
    }
}
