package agente2e

import (
	"encoding/json"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/gwagent/gwagent/hub"
	"github.com/gwagent/gwagent/internal/testutil"
)

// logLevelAck reports whether the twin acknowledges the desired logLevel of
// version v with value want.
func logLevelAck(rep map[string]any, v int64, want string) bool {
	return text(field(rep, "logLevel", "av")) == text(v) && field(rep, "logLevel", "value") == want &&
		text(field(rep, "logLevel", "ac")) == "200"
}

// A desired change made while the agent could not hear it is caught by the
// twin GET that follows the next connect: after a full stop and start of
// the process, and after a hub outage the running agent rode out.
func TestDesiredWhileOffline(t *testing.T) {
	t.Parallel()
	t.Run("agent stopped", func(t *testing.T) {
		t.Parallel()
		e := newHubEnv(t)
		setup := e.agentSetup(t)
		a1 := startAgent(t, setup, "gwagent (first)")
		e.waitStandBy(t)
		if err := a1.stop(t); err != nil {
			t.Fatalf("gwagent after SIGTERM: %v", err)
		}
		testutil.Eventually(t, wait, "the hub to see the device gone", func() bool { return !e.hub().Connected(deviceID) })

		v, err := e.hub().UpdateDesired(deviceID, map[string]any{"logLevel": "debug"})
		if err != nil {
			t.Fatal(err)
		}
		a2 := startAgent(t, setup, "gwagent (restarted)")
		e.waitReported(t, "logLevel debug acknowledged", func(rep map[string]any) bool { return logLevelAck(rep, v, "debug") })
		// The running level followed: debug lines appear.
		a2.waitLog(t, "a debug line", func(l logLine) bool { return l.level() == "debug" })
		if err := a2.stop(t); err != nil {
			t.Fatalf("gwagent after SIGTERM: %v", err)
		}
	})
	t.Run("hub outage", func(t *testing.T) {
		t.Parallel()
		e := newHubEnv(t)
		a := startAgent(t, e.agentSetup(t), "gwagent")
		e.waitStandBy(t)
		e.stop(t)
		a.waitLog(t, "the lost connection", msgIs("connection lost"))

		// The service changes the twin through a hub the agent cannot
		// reach: the same state on another port.
		aside := startAside(t, e)
		v, err := aside.UpdateDesired(deviceID, map[string]any{"logLevel": "warn"})
		if err != nil {
			t.Fatal(err)
		}
		if aside.Connected(deviceID) {
			t.Fatal("the agent reached the hub on a port it was not given")
		}
		if err := aside.Close(); err != nil {
			t.Fatal(err)
		}

		e.restart(t)
		e.waitReported(t, "logLevel warn acknowledged", func(rep map[string]any) bool { return logLevelAck(rep, v, "warn") })
		if !a.running() || a.log.count(msgIs("connected")) < 2 {
			t.Fatalf("the same agent process should have reconnected (running %v)", a.running())
		}
		if err := a.stop(t); err != nil {
			t.Fatalf("gwagent after SIGTERM: %v", err)
		}
	})
}

// With a SAS token that lives sasTTL, the agent reconnects with a fresh
// token before the hub would drop it: after more than one lifetime the hub
// has closed no connection for expiry, the agent lost none, an update whose
// download spans the renewal reports every stage, and a method call and its
// reported patch still go through.
func TestSASRenewalBeforeExpiry(t *testing.T) {
	t.Parallel()
	const ttl = 15 * time.Second
	e := newHubEnv(t)
	// The download (12 s, progress every 1 %) spans the first renewal, due
	// 0.8 × 14–15 s after the connect.
	a := startAgent(t, e.agentSetup(t, "GWAGENT_HUB_SASTTL="+ttl.String(),
		"GWAGENT_INSTALLER_SIMULATED_DOWNLOAD=12s", "GWAGENT_REPORT_MINPERCENTSTEP=1"), "gwagent")
	e.waitStandBy(t)
	connects := e.hubLogs("device connected")
	if len(connects) == 0 {
		t.Fatal("no connection in the hub's log")
	}
	first := connects[0].Time

	id := e.startUpdate(t, `{"fwPackageUri":"test.com/fw.bin","version":"6.0.0"}`)
	rep := e.waitCompleted(t, id)
	patches := e.rec.all()
	if got := statuses(patches); !slices.Equal(got, allStates) {
		t.Errorf("accepted firmwareStatus sequence %v, want %v", got, allStates)
	}
	checkCompleted(t, patches, rep, id, "6.0.0")
	renewed := e.hubLogs("device connected")
	if len(renewed) < 2 || !renewed[1].Time.Before(patches[len(patches)-1].At) {
		t.Errorf("no renewal during the update (%d connects)", len(renewed))
	}

	testutil.Eventually(t, wait, "more than one token lifetime with a renewal", func() bool {
		return time.Since(first) > ttl+2*time.Second && len(e.hubLogs("device connected")) >= 2
	})
	if n := len(e.hubLogs("SAS token expired, closing connection")); n != 0 {
		t.Errorf("the hub closed %d connections for an expired token", n)
	}
	for _, le := range e.hubLogs("device disconnected") {
		if reason, _ := le.ContextMap()["reason"].(string); strings.Contains(strings.ToLower(reason), "expire") {
			t.Errorf("disconnected for %q", reason)
		}
	}
	if n := a.log.count(msgIs("renewing the SAS token: reconnecting")); n < 1 {
		t.Error("the agent logged no planned renewal")
	}
	if n := a.log.count(msgIs("connection lost")); n != 0 {
		t.Errorf("the agent lost its connection %d times", n)
	}

	res := e.invoke(t, "reboot", "")
	var body map[string]any
	if err := json.Unmarshal(res.Payload, &body); err != nil || res.Status != 200 || body["status"] != "rebooting" {
		t.Fatalf("reboot answered %d %s", res.Status, res.Payload)
	}
	rep = e.waitReported(t, "lastReboot", func(rep map[string]any) bool { return field(rep, "iothubDM", "reboot", "lastReboot") != nil })
	if at := stamp(t, "lastReboot", field(rep, "iothubDM", "reboot", "lastReboot")); at.Before(first.Add(ttl).Truncate(time.Millisecond)) {
		t.Errorf("lastReboot %v is not after the first token's lifetime (%v)", at, first.Add(ttl))
	}
	if err := a.stop(t); err != nil {
		t.Fatalf("gwagent after SIGTERM: %v", err)
	}
}

// startAside starts a hub on e's state directory but on ports the agent was
// not given (the kernel may hand out the port e had; then another is taken).
func startAside(t *testing.T, e *hubEnv) *hub.Hub {
	t.Helper()
	for range 5 {
		h, err := hub.New(hub.Config{StateDir: e.dir, MQTTAddr: "127.0.0.1:0", HTTPSAddr: "127.0.0.1:0"})
		if err != nil {
			t.Fatal(err)
		}
		if err := h.Start(t.Context()); err != nil {
			t.Fatal(err)
		}
		if h.MQTTAddr() != e.mqttAddr {
			return h
		}
		if err := h.Close(); err != nil {
			t.Fatal(err)
		}
	}
	t.Fatalf("the kernel kept handing out %s", e.mqttAddr)
	return nil
}
