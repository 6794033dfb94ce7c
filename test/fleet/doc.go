// Package fleet starts a fleet of gateways on one machine for the fleet
// test, `make fleet-demo` and `make bench`: a gwhub process on free
// loopback ports, devices registered with twin tags (tags.site, tags.ring,
// tags.bad), one real gwagent process per device (simulated installer,
// short stages, its own state directory and SAS connection string), some
// of them held offline until started, and a signed firmware image served
// over a real HTTP server.
//
// A subset of the devices is set up to fail: their signature.keyDir trusts
// another key than the one the image is signed with, so the one image a
// rollout sends to all fails verification on them (verifyFailed, before a
// byte of the image is downloaded) and installs on the others.
//
// It runs the programs built into a folder (gwhub, gwagent, gwctl; Build
// makes them) and imports nothing from agent/, so what it drives is what
// an operator runs.
package fleet
