// Command gwctl is the operator's side of gwagent: it registers devices,
// reads and writes twins, invokes direct methods and starts and watches
// firmware updates through IoT Hub's service REST API, so the same commands
// work against the local gwhub and a real Azure IoT Hub.
//
//	gwctl device add|show|delete ID      gwctl device list
//	gwctl twin show ID                   gwctl twin set ID --desired JSON
//	gwctl method invoke ID NAME [--payload JSON]
//	gwctl update ID --uri URL [--version V] [--sha256 H] [--size N] [--watch]
//	gwctl update cancel ID [--update-id UPDATE]
//	gwctl query SQL
//
// The work is done by package service; this command only parses flags,
// prints and chooses the exit code. It keeps no state between runs and never
// speaks MQTT.
package main
