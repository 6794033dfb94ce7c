// Package agent is the gwagent daemon: it wires the configuration, the hub
// session, the method router, the firmware state machine, the reported-patch
// queue and systemd together and runs them with one lifecycle.
//
// It owns the lifecycle (start offline, READY once the state is open, a
// bounded graceful stop that stops intake, flushes the queue, persists state
// and disconnects), the systemd protocol (READY, STATUS, STOPPING, watchdog
// pings gated by an internal health check), the direct methods
// (firmwareUpdate, cancelFirmwareUpdate, reboot), the writable desired properties (logLevel), the
// health verdict that gates the commit of a trial boot (agent/health) and the
// local control socket through which gwagent commit and rollback reach the
// running state machine (agent/local).
//
// It must not speak MQTT (agent/session does), build or persist reported
// patches (twin and its subpackages do) or touch the device (firmware and
// its backends do); and it must not read flags or signals: cmd/gwagent does
// and hands the results in. Nothing outside cmd/gwagent imports agent/: the
// hub and gwctl share only iothub/, twin/ and internal/.
package agent
