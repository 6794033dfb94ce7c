// Package iothub is the Azure IoT Hub dialect shared by the agent, the local
// hub and gwctl: MQTT topic names and their parsing, property bags, MQTT
// usernames, SAS tokens, connection strings, and the shapes of the service
// REST API (methods, devices, twins, error bodies).
//
// It owns only encoding and decoding. It does no I/O, holds no state and
// starts no goroutines, so both sides of the protocol can trust that they
// speak the same language. Everything here follows the IoT Hub protocol as
// documented and as the official SDKs send it, not what the local hub happens
// to accept.
package iothub

// APIVersion is the api-version the agent and gwctl send.
const APIVersion = "2021-04-12"
