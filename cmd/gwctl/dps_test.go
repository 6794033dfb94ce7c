package main

import (
	"crypto/hmac"
	"crypto/sha256"
	"crypto/tls"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/gwagent/gwagent/hub"
	"github.com/gwagent/gwagent/iothub"
	"github.com/gwagent/gwagent/iothub/dps"
)

// registerDPS is a device of the DPS device protocol over MQTT on the hub
// (which is also the DPS): register, wait out the 202, poll the operation.
// It returns the final registration state, or the CONNACK error.
func registerDPS(t *testing.T, h *hub.Hub, regID, key string) (dps.RegistrationState, error) {
	t.Helper()
	k, err := base64.StdEncoding.DecodeString(key)
	if err != nil {
		t.Fatal(err)
	}
	return registerDPSAs(t, h, regID, iothub.NewSAS(dps.Resource(h.IDScope(), regID), k, dps.RegistrationKeyName, time.Now().Add(time.Hour)), nil)
}

// registerDPSAs is registerDPS with a password (SAS token) or a client
// certificate (X.509).
func registerDPSAs(t *testing.T, h *hub.Hub, regID, password string, cert *tls.Certificate) (dps.RegistrationState, error) {
	t.Helper()
	tc := &tls.Config{RootCAs: h.RootCAs(), ServerName: h.HostName(), MinVersion: tls.VersionTLS12}
	if cert != nil {
		tc.Certificates = []tls.Certificate{*cert}
	}
	msgs := make(chan paho.Message, 4)
	opts := paho.NewClientOptions().
		AddBroker("tls://" + h.MQTTAddr()).
		SetClientID(regID).
		SetUsername(dps.Username(h.IDScope(), regID, "gwctl-test/1")).
		SetPassword(password).
		SetProtocolVersion(4).
		SetCleanSession(true).
		SetAutoReconnect(false).
		SetConnectRetry(false).
		SetTLSConfig(tc)
	c := paho.NewClient(opts)
	if tok := c.Connect(); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		return dps.RegistrationState{}, fmt.Errorf("connect: %v", tok.Error())
	}
	defer c.Disconnect(250)
	if tok := c.Subscribe(dps.ResponseFilter, 1, func(_ paho.Client, m paho.Message) { msgs <- m }); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		t.Fatalf("subscribe: %v", tok.Error())
	}
	next := func() (dps.Response, dps.OperationResult) {
		select {
		case m := <-msgs:
			r, err := dps.ParseResponseTopic(m.Topic())
			if err != nil {
				t.Fatalf("response topic %q: %v", m.Topic(), err)
			}
			var res dps.OperationResult
			_ = json.Unmarshal(m.Payload(), &res)
			return r, res
		case <-time.After(15 * time.Second):
			t.Fatal("no DPS response")
			return dps.Response{}, dps.OperationResult{}
		}
	}
	body, _ := json.Marshal(dps.RegistrationRequest{RegistrationID: regID})
	c.Publish(dps.RegisterTopic("1"), 1, false, body).WaitTimeout(10 * time.Second)
	r, res := next()
	for i := 2; r.Status == 202; i++ {
		if i > 10 {
			t.Fatal("still assigning after 10 polls")
		}
		time.Sleep(r.RetryAfter) // the protocol's retry-after, one second from gwhub
		c.Publish(dps.StatusTopic(fmt.Sprint(i), res.OperationID), 1, false, " ").WaitTimeout(10 * time.Second)
		r, res = next()
	}
	if r.Status != 200 || res.RegistrationState == nil {
		return dps.RegistrationState{}, fmt.Errorf("registration answered %d", r.Status)
	}
	return *res.RegistrationState, nil
}

// keysOf picks the keys out of the text output of add.
func keysOf(t *testing.T, out string) (primary, secondary string) {
	t.Helper()
	m := regexp.MustCompile(`(?m)^primaryKey:\s+(\S+)\nsecondaryKey:\s+(\S+)$`).FindStringSubmatch(out)
	if m == nil {
		t.Fatalf("no keys in %q", out)
	}
	return m[1], m[2]
}

// TestDPSAgainstLocalHub runs the DPS operator's commands against the real
// gwhub, and registers devices with what they print over the DPS device
// protocol: an enrollment group and a key from derive-key, an individual
// enrollment with its own device id, and the registration states after.
func TestDPSAgainstLocalHub(t *testing.T) {
	h, e := startHub(t)

	r := e.gwctl(t, "dps", "group", "add", "factory")
	if r.code != 0 {
		t.Fatalf("group add: %d %s", r.code, r.stderr)
	}
	groupKey, secondary := keysOf(t, r.stdout)
	if k, _ := base64.StdEncoding.DecodeString(groupKey); len(k) != dpsKeyBytes || groupKey == secondary {
		t.Fatalf("generated keys %q %q", groupKey, secondary)
	}
	if !strings.Contains(r.stdout, "created enrollment group factory (enabled)") || !strings.Contains(r.stderr, "derive-key") {
		t.Errorf("group add: %q %q", r.stdout, r.stderr)
	}
	if r = e.gwctl(t, "dps", "group", "add", "factory"); r.code != 1 || !strings.Contains(r.stderr, "enrollment group factory already exists") {
		t.Errorf("group add twice: %d %q", r.code, r.stderr)
	}
	// The keys are printed once: show and list leave them out unless asked.
	r = e.gwctl(t, "dps", "group", "show", "factory")
	if r.code != 0 || !strings.Contains(r.stdout, "provisioningStatus:  enabled") || strings.Contains(r.stdout, groupKey) {
		t.Errorf("group show: %d %q %q", r.code, r.stdout, r.stderr)
	}
	if r = e.gwctl(t, "dps", "group", "show", "factory", "--show-keys"); !strings.Contains(r.stdout, "primaryKey:          "+groupKey) {
		t.Errorf("group show --show-keys: %q", r.stdout)
	}
	r = e.gwctl(t, "-o", "json", "dps", "group", "list")
	var groups []dps.EnrollmentGroup
	if err := json.Unmarshal([]byte(r.stdout), &groups); err != nil || len(groups) != 1 || groups[0].EnrollmentGroupID != "factory" ||
		groups[0].Attestation.Type != dps.AttestationSymmetricKey || strings.Contains(r.stdout, groupKey) {
		t.Errorf("group list json: %v %s", err, r.stdout)
	}

	// The factory derives the gateway's key; the gateway registers with it.
	r = e.gwctl(t, "dps", "derive-key", "--group-key", groupKey, "gw-0042")
	if r.code != 0 {
		t.Fatalf("derive-key: %d %s", r.code, r.stderr)
	}
	derived := strings.TrimSpace(r.stdout)
	st, err := registerDPS(t, h, "gw-0042", derived)
	if err != nil || st.Status != dps.StatusAssigned || st.AssignedHub != "gwhub.test" || st.DeviceID != "gw-0042" {
		t.Fatalf("register with the derived key: %+v %v", st, err)
	}
	// The group key itself is not a device key.
	if _, err := registerDPS(t, h, "gw-0043", groupKey); err == nil {
		t.Error("registered with the group key itself")
	}

	r = e.gwctl(t, "dps", "registration", "show", "gw-0042")
	if r.code != 0 || !regexp.MustCompile(`status:\s+assigned\n`).MatchString(r.stdout) ||
		!regexp.MustCompile(`assignedHub:\s+gwhub.test\n`).MatchString(r.stdout) {
		t.Errorf("registration show: %d %q %q", r.code, r.stdout, r.stderr)
	}
	r = e.gwctl(t, "dps", "group", "registrations", "factory")
	if r.code != 0 || !regexp.MustCompile(`(?m)^gw-0042\s+assigned\s+gw-0042\s+gwhub.test`).MatchString(r.stdout) {
		t.Errorf("group registrations: %d %q %q", r.code, r.stdout, r.stderr)
	}
	if r = e.gwctl(t, "dps", "registration", "show", "gw-0099"); r.code != 1 || !strings.Contains(r.stderr, "registration gw-0099 not found (404") {
		t.Errorf("unknown registration: %d %q", r.code, r.stderr)
	}

	// An individual enrollment with keys given and its own device id.
	key := base64.StdEncoding.EncodeToString([]byte("0123456789abcdef0123456789abcdef"))
	r = e.gwctl(t, "dps", "enrollment", "add", "line-7", "--device-id", "gw-line-7", "--primary-key", key)
	if r.code != 0 {
		t.Fatalf("enrollment add: %d %s", r.code, r.stderr)
	}
	if p, _ := keysOf(t, r.stdout); p != key {
		t.Errorf("enrollment add printed primary %q, want the one given", p)
	}
	if st, err := registerDPS(t, h, "line-7", key); err != nil || st.DeviceID != "gw-line-7" {
		t.Fatalf("register line-7: %+v %v", st, err)
	}
	r = e.gwctl(t, "dps", "enrollment", "list")
	if r.code != 0 || !regexp.MustCompile(`(?m)^line-7\s+gw-line-7\s+symmetricKey\s+enabled\s+assigned$`).MatchString(r.stdout) {
		t.Errorf("enrollment list: %d %q %q", r.code, r.stdout, r.stderr)
	}
	r = e.gwctl(t, "dps", "enrollment", "show", "line-7")
	if r.code != 0 || !strings.Contains(r.stdout, "assigned to gwhub.test as gw-line-7") || strings.Contains(r.stdout, key) {
		t.Errorf("enrollment show: %d %q %q", r.code, r.stdout, r.stderr)
	}
	// The hub knows the devices DPS created.
	if r = e.gwctl(t, "device", "show", "gw-line-7"); r.code != 0 {
		t.Errorf("device show gw-line-7: %d %s", r.code, r.stderr)
	}

	for _, args := range [][]string{{"enrollment", "delete", "line-7"}, {"group", "delete", "factory"}} {
		if r = e.gwctl(t, append([]string{"dps"}, args...)...); r.code != 0 || !strings.HasPrefix(r.stdout, "deleted ") {
			t.Errorf("%v: %d %q %q", args, r.code, r.stdout, r.stderr)
		}
	}
	if r = e.gwctl(t, "dps", "group", "show", "factory"); r.code != 1 || !strings.Contains(r.stderr, "enrollment group factory not found (404") {
		t.Errorf("deleted group: %d %q", r.code, r.stderr)
	}
	if r = e.gwctl(t, "dps", "enrollment", "delete", "line-7"); r.code != 1 || !strings.Contains(r.stderr, "enrollment line-7 not found (404") {
		t.Errorf("delete twice: %d %q", r.code, r.stderr)
	}

	// The hub's own policy does not open DPS, and gwctl says which string to fix.
	e2 := *e
	e2.dpsCS = e.cs
	if r = e2.gwctl(t, "dps", "group", "list"); r.code != 1 || !strings.Contains(r.stderr, "DPS refused the credentials: check the DPS connection string (401") {
		t.Errorf("hub policy on DPS: %d %q", r.code, r.stderr)
	}
}

func TestDPSDeriveKey(t *testing.T) {
	e := &env{} // derive-key needs no service
	groupKey := base64.StdEncoding.EncodeToString([]byte("the factory's group key, 32 byte"))
	m := hmac.New(sha256.New, []byte("the factory's group key, 32 byte"))
	m.Write([]byte("gw-0042"))
	want := base64.StdEncoding.EncodeToString(m.Sum(nil))

	keyFile := filepath.Join(t.TempDir(), "group.key")
	if err := os.WriteFile(keyFile, []byte(groupKey+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		name string
		args []string
		code int
		out  string // stdout, or a substring of stderr when code != 0
	}{
		{"flag", []string{"--group-key", groupKey, "gw-0042"}, 0, want + "\n"},
		{"file", []string{"--group-key-file", keyFile, "gw-0042"}, 0, want + "\n"},
		{"json", []string{"--group-key", groupKey, "gw-0042", "-o", "json"}, 0, "{\n  \"key\": \"" + want + "\",\n  \"registrationId\": \"gw-0042\"\n}\n"},
		{"no key", []string{"gw-0042"}, 64, "group-key"},
		{"both", []string{"--group-key", groupKey, "--group-key-file", keyFile, "gw-0042"}, 64, "group-key"},
		{"not base64", []string{"--group-key", "not base64!", "gw-0042"}, 64, "the group key is not base64"},
		{"bad registration id", []string{"--group-key", groupKey, "GW 42"}, 64, `registration id "GW 42" is not valid`},
		{"no registration id", []string{"--group-key", groupKey}, 64, "REGISTRATION_ID"},
		{"missing file", []string{"--group-key-file", keyFile + ".none", "gw-0042"}, 64, "--group-key-file"},
	} {
		t.Run(c.name, func(t *testing.T) {
			r := e.gwctl(t, append([]string{"dps", "derive-key"}, c.args...)...)
			if r.code != c.code {
				t.Fatalf("exit %d, want %d; stderr %q", r.code, c.code, r.stderr)
			}
			if c.code == 0 && r.stdout != c.out || c.code != 0 && !strings.Contains(r.stderr, c.out) {
				t.Errorf("stdout %q stderr %q, want %q", r.stdout, r.stderr, c.out)
			}
		})
	}
}

// Without a DPS connection string the dps commands say where to get one.
func TestDPSNoConnectionString(t *testing.T) {
	e := &env{cs: "HostName=h.example;SharedAccessKeyName=iothubowner;SharedAccessKey=" + base64.StdEncoding.EncodeToString([]byte("k"))}
	r := e.gwctl(t, "dps", "group", "list")
	if r.code != 64 || !strings.Contains(r.stderr, "IOTHUB_DPS_CONNECTION_STRING") {
		t.Errorf("%d %q", r.code, r.stderr)
	}
	e.dpsCS = "HostName=h.example;DeviceId=d;SharedAccessKey=" + base64.StdEncoding.EncodeToString([]byte("k"))
	if r = e.gwctl(t, "dps", "enrollment", "list"); r.code != 64 || !strings.Contains(r.stderr, "device connection string") {
		t.Errorf("%d %q", r.code, r.stderr)
	}
}
