// Package writable applies desired twin properties the agent lets an
// operator set (such as logLevel) and acknowledges each one the IoT Plug and
// Play way: the reported property of the same name becomes
// {"value": <in effect>, "ac": <status>, "av": <desired $version>, "ad": <why>}.
//
// It owns which desired keys mean something: known ones are applied (200)
// or refused with the reason (400); unknown ones are acknowledged with 400 so
// the operator sees the typo; a property no longer desired returns to its
// configured value. It must not send anything itself (acks go to a Sink, the
// twin queue) and must never acknowledge over a reported property the agent
// owns (firmwareStatus, firmware, …).
package writable
