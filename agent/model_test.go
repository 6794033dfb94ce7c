package agent

import (
	"encoding/json"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"

	"github.com/gwagent/gwagent/agent/config"
	"github.com/gwagent/gwagent/internal/testutil"
	"github.com/gwagent/gwagent/iothub"
	"github.com/gwagent/gwagent/iothub/service"
)

// dtdlModel is the part of docs/dtdl/gateway.json the agent must match.
type dtdlModel struct {
	Context  string `json:"@context"`
	ID       string `json:"@id"`
	Type     string `json:"@type"`
	Contents []struct {
		Type     any    `json:"@type"` // a string, or an array of types
		Name     string `json:"name"`
		Writable bool   `json:"writable"`
	} `json:"contents"`
}

func (m dtdlModel) names(kind string, writable bool) []string {
	var out []string
	for _, c := range m.Contents {
		if c.Type == kind && c.Writable == writable {
			out = append(out, c.Name)
		}
	}
	slices.Sort(out)
	return out
}

// The shipped DTDL model names exactly the methods, reported properties and
// writable properties the agent has, so that the two cannot drift apart.
func TestDTDLModelMatchesTheAgent(t *testing.T) {
	b, err := os.ReadFile("../docs/dtdl/gateway.json")
	if err != nil {
		t.Fatal(err)
	}
	var m dtdlModel
	if err := json.Unmarshal(b, &m); err != nil {
		t.Fatalf("docs/dtdl/gateway.json: %v", err)
	}
	if m.ID != config.DefaultModelID || m.Type != "Interface" || (m.Context != "dtmi:dtdl:context;3" && m.Context != "dtmi:dtdl:context;2") {
		t.Fatalf("model %q of type %q in context %q; want interface %s", m.ID, m.Type, m.Context, config.DefaultModelID)
	}

	e := newEnv(t)
	a, err := New(Options{Config: loadConfig(t, e.yaml(nil)), Log: zap.NewNop()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = a.queue.Close() })

	if got, want := m.names("Command", false), a.router.Methods(); !slices.Equal(got, want) {
		t.Errorf("model commands %v, agent methods %v", got, want)
	}
	if got, want := m.names("Property", true), a.acker.Names(); !slices.Equal(got, want) {
		t.Errorf("model writable properties %v, agent %v", got, want)
	}
	reported := slices.Sorted(slices.Values(reservedReported))
	if got := m.names("Property", false); !slices.Equal(got, reported) {
		t.Errorf("model reported properties %v, agent writes %v", got, reported)
	}
}

// The agent announces its model in the MQTT username; the hub keeps it on
// the device's twin (modelId), where the service API shows it, and a
// configured hub.modelId replaces the default.
func TestModelIDReachesTheTwin(t *testing.T) {
	e := newEnv(t)
	cs, err := iothub.ParseConnectionString(e.ServiceConnectionString())
	if err != nil {
		t.Fatal(err)
	}
	svc, err := service.New(cs, service.Options{BaseURL: "https://" + e.HTTPSAddr(), CAFile: e.CAFile()})
	if err != nil {
		t.Fatal(err)
	}
	defer svc.CloseIdleConnections()
	modelOf := func() string {
		tw, err := svc.GetTwin(t.Context(), deviceID)
		if err != nil {
			t.Fatal(err)
		}
		return tw.ModelID
	}
	if m := modelOf(); m != "" {
		t.Fatalf("modelId %q before the device connected", m)
	}

	r := start(t, loadConfig(t, e.yaml(nil)))
	testutil.Eventually(t, 20*time.Second, "the default model id on the twin", func() bool { return modelOf() == config.DefaultModelID })
	if err := r.stop(t); err != nil {
		t.Fatal(err)
	}

	hub := e.yaml(nil)
	start(t, loadConfig(t, strings.Replace(hub, "hub:\n", "hub:\n  modelId: \"dtmi:acme:gateway:Line7;2\"\n", 1)))
	testutil.Eventually(t, 20*time.Second, "the configured model id on the twin", func() bool { return modelOf() == "dtmi:acme:gateway:Line7;2" })
}
