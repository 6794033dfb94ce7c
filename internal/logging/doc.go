// Package logging builds the daemon's one *zap.Logger.
//
// It owns the choice of output and the encoding of log entries: under systemd
// (stderr connected to the journal, per systemd.exec(5) JOURNAL_STREAM) entries
// go to journald over its native protocol, every zap field becoming a journal
// field with an UPPER_SNAKE name (update_id → UPDATE_ID), so that
// `journalctl -u gwagent UPDATE_ID=…` and `journalctl -p warning` work; on a
// terminal they are human readable; anywhere else they are JSON lines.
//
// It must not hold global state (no zap.ReplaceGlobals) and must not decide
// what the daemon logs: callers name their loggers and choose their fields.
package logging
