// Package router dispatches IoT Hub direct methods to handlers by name.
//
// It owns the method response contract: every call gets a status and a valid
// JSON body — 404 {"error":"unknown method NAME"} for a name nobody handles,
// 500 for a handler that panics, 504 for one that does not answer in time —
// so a bad handler can never send the caller something it cannot parse.
// ServeMethod runs the handler on the caller's goroutine (the session's, one
// per call) with the router's timeout as the deadline of its context: one
// goroutine, one timeout, one panic recovery, one Response type per call. It must not know what any method does; handlers are
// registered by the agent.
package router
