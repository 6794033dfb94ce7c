// Package report turns firmware progress into reported twin properties.
//
// It owns the shape of what the agent reports about firmware: the tutorial's
// top-level fields (firmwareStatus, logTime, downloadComplete,
// startedApplyingImage, lastFirmwareUpdate) and the "firmware" detail object,
// with null for every field that no longer applies, since reported
// properties are a merge patch. It decides which progress becomes a patch:
// every phase change and terminal state at once, as a milestone the queue
// never merges away; download progress rate-limited by percent step and
// interval, never delaying a phase change. It is the one place progress is
// throttled: the state machine may call Observe for every window it
// writes, so Observe is cheap (no allocation, a patch only when one is
// due), and the queue sends what it is given.
//
// It must not talk to the hub or persist anything itself: patches go to a
// Sink (the durable twin queue), which owns delivery.
package report
