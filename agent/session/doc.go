// Package session holds gwagent's MQTT 3.1.1 session with an IoT hub (Azure
// IoT Hub, IoT Edge, or the local gwhub).
//
// It owns the connection: TLS with server verification, a SAS token minted
// fresh on every connect and a planned reconnect before it expires (or an
// X.509 client certificate), reconnection with jittered exponential backoff,
// the three subscriptions and the twin GET that follow every connect, desired
// $version filtering, and twin request correlation by $rid. PatchReported
// is the publisher of the reported-patch queue; desired-property changes go
// in the hub's order to one worker goroutine.
//
// The path of a direct method: paho's router goroutine hands the request to
// onMethod (methods.go), which starts one goroutine for the call (at most
// Config.MaxMethodCalls in flight, beyond that 503 at once); that goroutine
// calls Config.Methods.ServeMethod (the agent's router: the one timeout and
// the one panic recovery), publishes the router.Response on the connection
// the call came in on, then runs its After hook.
//
// Files: session.go (configuration, state, Run), conn.go (connect, serve,
// reconnect, the message handler), twinrequests.go (twin GET and reported
// patches matched by $rid), desired.go, methods.go.
//
// It must not block paho's message router (handlers only decode and hand
// on), wait without a bound, or know what a method or a desired property
// means: that is the router's and the agent's business. It does not import
// twin: the hub's answers and errors are iothub's.
package session
