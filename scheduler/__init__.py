"""scheduler: follow-up plans, medication reminders, vaccination slots, outbound calls and the SMS outbox,
run by one active APScheduler per cluster over persistent jobs (see docs/outreach.md and docs/vaccination.md)."""
