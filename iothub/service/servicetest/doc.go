// Package servicetest is a small in-process IoT Hub service REST endpoint for
// tests of package service and gwctl: a TLS httptest server that checks
// api-version and the policy SAS token on every request, records what it
// was sent, keeps a registry and twins in memory, routes method calls to a
// Go function, and can be told to fail the next requests with an IoT Hub
// error. It is a test double with scripted behaviour, not a hub: the local
// hub lives in package hub.
package servicetest
