// Package writable applies desired twin properties the agent lets an
// operator set (such as logLevel) and acknowledges each one the IoT Plug and
// Play way: the reported property of the same name becomes
// {"value": <in effect>, "ac": <status>, "av": <desired $version>, "ad": <why>}.
//
// It owns which desired keys mean something: known ones are applied (200)
// or refused with the reason (400); a property no longer desired returns to
// its configured value. Unknown keys are acknowledged together, in one
// bounded reported property (UnknownKey: 400, how many, the first few
// names), so the operator sees a typo without the service's keys filling
// the reported properties; acknowledgements an older version wrote for
// each unknown key are withdrawn. When the hub refuses a state change
// because the reported properties are full, Withdrawal says what can go. It
// must not send anything itself (acks go to a Sink, the twin queue) and
// must never acknowledge over a reported property the agent owns
// (firmwareStatus, firmware, …).
package writable
