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
//	gwctl rollout start NAME --uri URL --version V (--query COND | --devices IDS) [--waves 1,10%,100%]
//	gwctl rollout status|run|pause|resume|cancel NAME    gwctl rollout list
//
// The work is done by package service; this command only parses flags,
// prints and chooses the exit code (rollout.go also holds the rollout's
// step: it reads and writes only the hub). It keeps no state between runs —
// a rollout's state is in the hub's twins — and never speaks MQTT.
package main
