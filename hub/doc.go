// Package hub is the local IoT hub behind gwhub: an embedded MQTT 3.1.1
// broker (mochi-mqtt) that speaks Azure IoT Hub's device protocol, a
// persistent device registry with twins, and IoT Hub's service REST API, so
// the agent, gwctl and the official Azure IoT SDKs can run against it
// unchanged. It follows docs/iothub-protocol.md §1–§7 and the emulator
// checklist of §10; the wire dialect (topics, property bags, SAS tokens,
// connection strings, REST shapes, error bodies) comes from iothub and
// the twin document rules (merge patch, validation, sizes) from twin.
//
// What it owns:
//
//   - TLS: on first start a private CA (DIR/ca.pem, the file clients must
//     trust) and a server certificate for Config.HostName, 127.0.0.1 and
//     ::1; or the operator's pair (Config.TLSCertFile/TLSKeyFile).
//   - Device connections: protocol level 4 only (CONNACK 0x01 otherwise);
//     only MQTT 3.1.1 return codes (0x02 for an empty client id; a
//     CONNECT that 3.1.1 calls malformed, or one with a will at QoS 2, is
//     closed without a CONNACK); client id = device id; the username in both IoT Hub forms with a
//     matching host; a SAS token checked against the device's keys (or the
//     iothubowner policy key) and its expiry, or an X.509 client
//     certificate matched by SHA-1 or SHA-256 thumbprint; CONNACK 0x05 when
//     refused, 0x03 for a disabled device. The connection is closed when
//     the token expires, when the device connects again (the newer wins),
//     on a PUBLISH with QoS 2 or to a topic it may not use, and after 1.5 ×
//     keep-alive of silence (capped by Config.KeepAliveCap, 1767 s). A
//     SUBSCRIBE to an undocumented filter gets SUBACK 0x80; at most five
//     subscriptions are held.
//   - Twins over MQTT: GET (desired and reported with $version, no
//     $metadata), reported PATCH (validated, merged, 32 KB limit, 204 with
//     the new $version, 400 with an IoT Hub error body otherwise), desired
//     notifications with $version in topic and body, only to connected and
//     subscribed devices.
//   - Direct methods: POST /twins/{id}/methods publishes the call at QoS 0
//     to the connected and subscribed device and waits for its answer,
//     honouring responseTimeoutInSeconds and connectTimeoutInSeconds;
//     404103, 504101, 404001, 400 and 413 as IoT Hub answers them. A
//     device answer that is not JSON is refused (400).
//   - The service REST API over HTTPS, authenticated by service SAS tokens
//     of the iothubowner policy whose connection string the hub creates in
//     DIR/service-connection-string: /devices (registry, with etags),
//     /twins/{id} (GET/PATCH/PUT with If-Match), /twins/{id}/methods and
//     /devices/query (ParseQuery, FROM devices and FROM devices.jobs), and
//     jobs v2 at /jobs/v2 (jobs.go: scheduled method calls and twin updates
//     over a query condition, paced at Config.JobDeviceRate, kept in
//     DIR/jobs.json and resumed at start). Optionally /files/ (Config.FilesDir:
//     unauthenticated, so regular files inside the folder only, resolved
//     through os.Root so no symlink leads out, no listings, no dotfiles)
//     and MQTT over WebSocket at /$iothub/websocket.
//   - Throttling (throttle.go): with Config.TwinWriteRate, service-side twin
//     writes over the rate (REST PATCH/PUT /twins/{id}) are answered 429
//     ThrottlingException (429001) with Retry-After and change nothing;
//     jobs' twin updates wait for their turn. TwinWriteStats counts them.
//   - Hostile clients: every new connection must finish its TLS handshake
//     and CONNECT (or WebSocket upgrade, or HTTPS request headers) within
//     Config.ConnectTimeout; connections that have not authenticated yet
//     are capped in all and per remote IP (Config.MaxPreAuthConns,
//     MaxPreAuthConnsPerIP) and those over a cap are closed at once; a
//     failing accept (no descriptors left) is retried with backoff, so
//     the listener serves again once descriptors are free. Refusals and
//     accept errors are logged at most once per 10 s. A service request
//     must arrive whole within Config.ReadTimeout; one without a valid
//     token is answered 401 from its headers, its body unread, and its
//     connection closed.
//   - Persistence: one JSON record per device in DIR/devices, written
//     atomically on every change, so a restarted hub keeps its devices,
//     twins and versions, and the model id a device names in its username
//     (model-id) as its twin's modelId.
//   - A Device Provisioning Service on the same host name and ports
//     (dps.go, dpsrest.go): the DPS device protocol over MQTT for
//     symmetric-key individual enrollments and enrollment groups,
//     assigning every device to this hub (creating its identity), and the
//     DPS service REST API (enrollments, enrollment groups, registration
//     states) behind the provisioningserviceowner policy whose connection
//     string it writes to DIR/dps-connection-string, with the id scope in
//     DIR/dps-id-scope.
//
// What it must not do: route device messages to other devices (every
// hub-to-device message is written to one connection), queue methods or
// desired patches for offline devices, or accept anything the real IoT Hub
// would refuse just because it is convenient.
//
// Go API (tests in other packages run the hub in-process):
//
//	h, err := hub.New(hub.Config{StateDir: dir, MQTTAddr: "127.0.0.1:0", HTTPSAddr: "127.0.0.1:0"})
//	err = h.Start(ctx)               // listening when it returns; stops when ctx is done
//	defer h.Close()
//	cs, err := h.CreateDevice("gw-01") // device connection string
//	h.MQTTAddr(), h.HTTPSAddr()     // bound addresses; dial them with ServerName h.HostName()
//	h.RootCAs(), h.CAFile(), h.ServiceConnectionString()
//	h.Twin(id), h.UpdateDesired(id, patch), h.InvokeMethod(ctx, id, req)
//
// Fault injection for device tests: InjectTwinFault (answer 429/5xx,
// delay, or drop the connection instead of answering, for the next N twin
// requests), ClearTwinFaults, Kick; and Config.OnReported, called with every
// accepted reported patch and its version, in order.
package hub
