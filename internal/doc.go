// Package internal holds the helpers that more than one of gwagent's
// programs or packages needs and that belong to none of them: logging (the
// zap logger for journald, a terminal or JSON), buildinfo (the version), cli
// (usage errors, exit 64, and "did you mean" for the three command lines),
// atomicfile (the one atomic, durable file write), retry (the one backoff
// policy) and testutil (helpers for tests only). Everything here is small,
// stateless and free of IoT Hub knowledge.
package internal
