// Package dps is the Azure IoT Hub Device Provisioning Service dialect: the
// device side over MQTT (usernames, SAS resources, request and response
// topics, the registration and operation bodies), the group-key derivation,
// and the shapes of the service REST API (enrollments, enrollment groups,
// registration states).
//
// Like package iothub it only encodes and decodes: no I/O, no state, no
// goroutines. The device client lives with its user (the agent), the
// server side in hub/, the REST client in iothub/service.
package dps
