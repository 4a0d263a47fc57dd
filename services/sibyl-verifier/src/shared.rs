//! State one session shares between its step loop (a blocking thread) and its drafter links
//! (async tasks): the accepted sequence and each drafter's inbox.

use sibyl_proto::v1 as pb;
use sibyl_spec::{AnchoredBlock, DraftInbox, DrafterId, InboxLimits, Proposal, TokenId};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LinkStatus {
    Connecting,
    Connected,
    Refused,
    Failed,
}

pub(crate) struct Link {
    pub(crate) inbox: DraftInbox,
    pub(crate) status: LinkStatus,
    /// The address the stream went to last.
    pub(crate) endpoint: String,
    /// The last error, if any.
    pub(crate) error: String,
    /// Blocks that did not even decode into a valid block.
    pub(crate) malformed: u64,
    /// Consecutive steps this drafter was not ready by the deadline.
    late_steps: u32,
}

/// After this many late steps in a row a drafter is no longer waited for (its blocks are
/// still used when they are there in time), until it is on time again.
const LATE_STEPS_BEFORE_NO_WAIT: u32 = 3;

impl Link {
    fn waited_for(&self) -> bool {
        self.status == LinkStatus::Connected && self.late_steps < LATE_STEPS_BEFORE_NO_WAIT
    }
}

pub(crate) struct State {
    /// Prompt and accepted tokens.
    pub(crate) context: Vec<TokenId>,
    pub(crate) links: Vec<Link>,
}

pub(crate) struct Shared {
    state: Mutex<State>,
    arrived: Condvar,
}

impl Shared {
    pub(crate) fn new(prompt: Vec<TokenId>, drafters: usize, limits: InboxLimits) -> Self {
        let links = (0..drafters)
            .map(|_| Link {
                inbox: DraftInbox::new(limits),
                status: LinkStatus::Connecting,
                endpoint: String::new(),
                error: String::new(),
                malformed: 0,
                late_steps: 0,
            })
            .collect();
        Self {
            state: Mutex::new(State {
                context: prompt,
                links,
            }),
            arrived: Condvar::new(),
        }
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn set_status(&self, link: usize, status: LinkStatus, error: Option<String>) {
        let mut state = self.lock();
        state.links[link].status = status;
        if status == LinkStatus::Connected {
            state.links[link].late_steps = 0;
        }
        if let Some(error) = error {
            state.links[link].error = error;
        }
        drop(state);
        self.arrived.notify_all();
    }

    pub(crate) fn set_endpoint(&self, link: usize, endpoint: String) {
        self.lock().links[link].endpoint = endpoint;
    }

    /// Checks and keeps a block from drafter `link`.
    pub(crate) fn push(&self, link: usize, block: pb::DraftBlock) {
        let mut state = self.lock();
        let State { context, links } = &mut *state;
        let link_state = &mut links[link];
        match AnchoredBlock::try_from(block) {
            Ok(mut block) => {
                // A drafter cannot prove that its tokens were drawn from the distributions
                // it sends, and rejection sampling with a false distribution would bias the
                // output; remote drafts are verified as point masses, which is exact.
                for branch in &mut block.branches {
                    branch.probs = None;
                }
                if let Err(rejection) = link_state.inbox.push(block, context) {
                    tracing::debug!(drafter = link, %rejection, "draft block dropped");
                }
            }
            Err(error) => {
                link_state.malformed += 1;
                tracing::debug!(drafter = link, %error, "malformed draft block dropped");
            }
        }
        drop(state);
        self.arrived.notify_all();
    }

    /// Appends accepted tokens to the sequence.
    pub(crate) fn extend(&self, tokens: &[TokenId]) {
        self.lock().context.extend_from_slice(tokens);
    }

    /// Waits until every connected drafter has spoken for the next position, or `wait` has
    /// passed, then takes each drafter's proposals. Returns them with the time waited.
    pub(crate) fn gather(&self, wait: Duration) -> (Vec<(DrafterId, Vec<Proposal>)>, Duration) {
        let started = Instant::now();
        let deadline = started + wait;
        let mut state = self.lock();
        loop {
            let State { context, links } = &*state;
            let all_ready = links
                .iter()
                .all(|l| !l.waited_for() || l.inbox.ready(context));
            let now = Instant::now();
            if all_ready || now >= deadline {
                break;
            }
            state = self
                .arrived
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        let waited = started.elapsed();
        let State { context, links } = &mut *state;
        for link in links.iter_mut() {
            if link.inbox.ready(context) {
                link.late_steps = 0;
            } else if link.status == LinkStatus::Connected {
                link.late_steps = link.late_steps.saturating_add(1);
            }
        }
        let proposals = links
            .iter_mut()
            .enumerate()
            .map(|(i, link)| (DrafterId(i), link.inbox.take(context)))
            .filter(|(_, proposals)| !proposals.is_empty())
            .collect();
        (proposals, waited)
    }
}
