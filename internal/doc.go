// Package internal holds the helpers that more than one of gwagent's
// programs needs and that are not part of any one of them: logging (the zap
// logger for journald, a terminal or JSON) and buildinfo (the version).
// Everything here is small, stateless and free of IoT Hub knowledge.
package internal
