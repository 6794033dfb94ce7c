package agent

import (
	"fmt"
	"net/http"
	"net/http/httptest"
	"testing"

	"github.com/gwagent/gwagent/internal/testutil"
)

// The reported firmwareHistory on the hub's twin records a failed and a
// completed update with their results, codes and desired ids, across a
// restart of the agent.
func TestFirmwareHistoryOnTwin(t *testing.T) {
	srv := httptest.NewServer(http.NotFoundHandler())
	defer srv.Close()
	e := newEnv(t)
	cfg := loadConfig(t, e.yaml(nil))
	e.desiredFW(t, map[string]any{"updateId": "r-404", "fwPackageUri": srv.URL + "/missing.bin", "version": "2.0.0"})
	r := start(t, cfg)
	entry := func(rep map[string]any, key string) map[string]any {
		h, _ := rep["firmwareHistory"].(map[string]any)
		m, _ := h[key].(map[string]any)
		return m
	}
	testutil.Eventually(t, wait, "the failed update in the history", func() bool {
		h := entry(e.reportedNow(t), "h1")
		return h["result"] == "failed"
	})
	if err := r.stop(t); err != nil {
		t.Fatal(err)
	}
	start(t, cfg)
	e.desiredFW(t, map[string]any{"updateId": "r-ok", "fwPackageUri": "test.com/fw.bin", "version": "2.0.0"})
	testutil.Eventually(t, wait, "the completed update in the history", func() bool {
		h := entry(e.reportedNow(t), "h2")
		return h["result"] == "completed"
	})
	rep := e.reportedNow(t)
	failed, done := entry(rep, "h1"), entry(rep, "h2")
	if failed["errorCode"] != "downloadFailed" || failed["desiredId"] != "r-404" || failed["version"] != "2.0.0" ||
		failed["endedAt"] == nil || fmt.Sprint(failed["seq"]) != "1" {
		t.Errorf("failed update's entry %v", failed)
	}
	if done["errorCode"] != nil || done["desiredId"] != "r-ok" || done["updateId"] != field(rep, "firmware", "updateId") || fmt.Sprint(done["seq"]) != "2" {
		t.Errorf("completed update's entry %v", done)
	}
	var names []any
	for _, p := range done["phases"].([]any) {
		names = append(names, p.(map[string]any)["phase"])
	}
	if len(names) < 3 || names[0] != "accepted" || names[1] != "downloading" || names[len(names)-1] != "completed" {
		t.Errorf("completed update's phases %v", names)
	}
}
