//! Every metric of the gateway, in one registry per gateway instance (no
//! global recorder, so tests do not leak into each other). Labels are bot and
//! route names, status classes and fixed vocabularies, never payload values.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::{Family, MetricConstructor};
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub bot: String,
    pub route: String,
    /// `2xx`, `4xx`, `5xx`, …
    pub status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BotRouteLabels {
    pub bot: String,
    pub route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub route: String,
    /// `success`, `failure`, `rate_limited`, `refused`.
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TransitionLabels {
    pub route: String,
    pub from: String,
    pub to: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    pub route: String,
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub route: String,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProbeLabels {
    pub route: String,
    pub result: String,
}

/// Histogram buckets suited to CRM calls: 5 ms … 30 s.
pub const LATENCY_BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 8.0, 15.0, 30.0,
];

#[derive(Clone)]
pub struct LatencyHistogram;

impl MetricConstructor<Histogram> for LatencyHistogram {
    fn new_metric(&self) -> Histogram {
        Histogram::new(LATENCY_BUCKETS)
    }
}

/// All metrics of one gateway.
pub struct Metrics {
    /// Off: events are not counted and latencies not recorded (for overhead measurements).
    pub enabled: bool,
    pub registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub request_duration: Family<BotRouteLabels, Histogram, LatencyHistogram>,
    pub downstream_duration: Family<RouteLabels, Histogram, LatencyHistogram>,
    pub downstream_tries: Family<OutcomeLabels, Counter>,
    pub retries: Family<RouteLabels, Counter>,
    pub breaker_state: Family<StateLabels, Gauge>,
    pub breaker_transitions: Family<TransitionLabels, Counter>,
    pub breaker_rejections: Family<ReasonLabels, Counter>,
    pub rate_limit_waits: Family<RouteLabels, Counter>,
    pub health_probes: Family<ProbeLabels, Counter>,
    pub token_grants: Family<ResultLabels, Counter>,
    pub reloads: Family<ResultLabels, Counter>,
    pub config_generation: Gauge,
    pub queue_depth: Family<StateOnlyLabels, Gauge>,
    pub oldest_pending_age: Gauge,
    pub dead_letters: Gauge,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateOnlyLabels {
    /// `pending` or `leased`.
    pub state: String,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("gateway");
        let m = Metrics {
            requests: Family::default(),
            request_duration: Family::new_with_constructor(LatencyHistogram),
            downstream_duration: Family::new_with_constructor(LatencyHistogram),
            downstream_tries: Family::default(),
            retries: Family::default(),
            breaker_state: Family::default(),
            breaker_transitions: Family::default(),
            breaker_rejections: Family::default(),
            rate_limit_waits: Family::default(),
            health_probes: Family::default(),
            token_grants: Family::default(),
            reloads: Family::default(),
            config_generation: Gauge::default(),
            queue_depth: Family::default(),
            oldest_pending_age: Gauge::default(),
            dead_letters: Gauge::default(),
            registry: Registry::default(),
            enabled: true,
        };
        registry.register(
            "requests",
            "Webhook requests answered, by bot, route and status class",
            m.requests.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Time from request arrival to answer",
            m.request_duration.clone(),
        );
        registry.register(
            "downstream_duration_seconds",
            "Duration of one downstream try",
            m.downstream_duration.clone(),
        );
        registry.register(
            "downstream_tries",
            "Downstream tries by outcome",
            m.downstream_tries.clone(),
        );
        registry.register(
            "retries",
            "Downstream tries after the first",
            m.retries.clone(),
        );
        registry.register(
            "breaker_state",
            "1 for the breaker's current state (closed, open, half_open)",
            m.breaker_state.clone(),
        );
        registry.register(
            "breaker_transitions",
            "Breaker state transitions",
            m.breaker_transitions.clone(),
        );
        registry.register(
            "breaker_rejections",
            "Calls not made because the route was open, paused, full or over its outbound rate limit",
            m.breaker_rejections.clone(),
        );
        registry.register(
            "rate_limit_waits",
            "Sync calls that waited for an outbound rate-limit token",
            m.rate_limit_waits.clone(),
        );
        registry.register(
            "health_probes",
            "Health probe results while a breaker was open",
            m.health_probes.clone(),
        );
        registry.register(
            "oauth2_token_requests",
            "OAuth2 token grants by result",
            m.token_grants.clone(),
        );
        registry.register(
            "reloads",
            "Configuration loads by result",
            m.reloads.clone(),
        );
        registry.register(
            "config_generation",
            "Generation of the running configuration",
            m.config_generation.clone(),
        );
        registry.register(
            "delivery_queue_depth",
            "Deliveries waiting (pending) or being tried (leased)",
            m.queue_depth.clone(),
        );
        registry.register(
            "delivery_oldest_pending_age_seconds",
            "Age of the oldest delivery not yet delivered nor dead",
            m.oldest_pending_age.clone(),
        );
        registry.register(
            "delivery_dead_letters",
            "Deliveries moved to the dead-letter list",
            m.dead_letters.clone(),
        );
        Metrics { registry, ..m }
    }

    /// Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// `200` → `2xx`.
pub fn status_class(status: u16) -> String {
    format!("{}xx", status / 100)
}

/// One route's metric handles, resolved once (label strings allocated and looked
/// up once, not per request); recording is then a few atomic operations.
pub struct RouteMetrics {
    downstream_duration: Histogram,
    /// By outcome: success, failure, rate_limited, refused.
    tries: [Counter; 4],
    retries: Counter,
    /// Per bot the route serves: requests by status class (1xx…5xx) and request duration.
    by_bot: Vec<(String, [Counter; 5], Histogram)>,
}

/// The `outcome` labels of `downstream_tries`, in `RouteMetrics::tries` order.
pub const TRY_OUTCOMES: [&str; 4] = ["success", "failure", "rate_limited", "refused"];

impl RouteMetrics {
    pub fn new(m: &Metrics, route: &str, bots: &[String]) -> Self {
        let r = RouteLabels {
            route: route.into(),
        };
        let tries = TRY_OUTCOMES.map(|o| {
            m.downstream_tries
                .get_or_create(&OutcomeLabels {
                    route: route.into(),
                    outcome: o.into(),
                })
                .clone()
        });
        let by_bot = bots
            .iter()
            .map(|bot| {
                let classes = [1u16, 2, 3, 4, 5].map(|c| {
                    m.requests
                        .get_or_create(&RequestLabels {
                            bot: bot.clone(),
                            route: route.into(),
                            status: format!("{c}xx"),
                        })
                        .clone()
                });
                let h = m
                    .request_duration
                    .get_or_create(&BotRouteLabels {
                        bot: bot.clone(),
                        route: route.into(),
                    })
                    .clone();
                (bot.clone(), classes, h)
            })
            .collect();
        RouteMetrics {
            downstream_duration: m.downstream_duration.get_or_create(&r).clone(),
            tries,
            retries: m.retries.get_or_create(&r).clone(),
            by_bot,
        }
    }

    /// Counts one answered request of `bot`; false when the bot is not one of the route's.
    pub fn request(&self, bot: &str, status: u16, seconds: f64) -> bool {
        let Some((_, classes, h)) = self.by_bot.iter().find(|(b, _, _)| b == bot) else {
            return false;
        };
        let class = usize::from((status / 100).clamp(1, 5)) - 1;
        classes[class].inc();
        h.observe(seconds);
        true
    }

    /// Counts one downstream try.
    pub fn try_outcome(&self, outcome: &str, seconds: f64) {
        if let Some(i) = TRY_OUTCOMES.iter().position(|o| *o == outcome) {
            self.tries[i].inc();
        }
        self.downstream_duration.observe(seconds);
    }

    pub fn retry(&self) {
        self.retries.inc();
    }
}
