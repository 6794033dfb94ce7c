// Package session holds gwagent's MQTT 3.1.1 session with an IoT hub (Azure
// IoT Hub, IoT Edge, or the local gwhub).
//
// It owns the connection: TLS with server verification, a SAS token minted
// fresh on every connect and a planned reconnect before it expires (or an
// X.509 client certificate), reconnection with jittered exponential backoff,
// the three subscriptions and the twin GET that follow every connect, desired
// $version filtering, and twin request correlation by $rid. It implements
// twin.Publisher for the reported-patch queue and hands direct methods and
// desired-property changes to callbacks on its own worker goroutines.
//
// It must not block paho's message router (handlers only decode and hand
// on), wait without a bound, or know what a method or a desired property
// means: that is the router's and the agent's business.
package session
