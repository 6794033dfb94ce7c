// Package service is a client for Azure IoT Hub's service REST API: the
// device registry, device twins, direct methods and twin queries, signed with
// a service (policy) connection string. gwctl is built on it, and tests use it
// to drive a hub (the local gwhub or a real Azure IoT Hub) the way an
// operator would.
//
// It owns the HTTP side only: SAS tokens for the policy (cached and renewed
// before they expire), api-version on every call, bounded retries with
// backoff for throttling and server errors, and the firmware-update watch
// loop over GET /twins/{id}. The wire shapes and error bodies come from
// package iothub and are not redefined here. It must not speak MQTT, keep
// state beyond its token cache, or depend on anything the local hub accepts
// that the real service would not: requests go to https://{HostName} with the
// documented paths and headers.
package service
