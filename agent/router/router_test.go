package router

import (
	"context"
	"encoding/json"
	"testing"
	"time"

	"go.uber.org/goleak"
	"go.uber.org/zap/zaptest"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func TestServeMethod(t *testing.T) {
	r := New(zaptest.NewLogger(t), 200*time.Millisecond)
	afterRan := false
	r.Handle("echo", func(_ context.Context, p []byte) Response {
		return JSON(200, json.RawMessage(p))
	})
	r.Handle("panics", func(context.Context, []byte) Response { panic("boom") })
	r.Handle("slow", func(ctx context.Context, _ []byte) Response {
		<-ctx.Done()
		return JSON(200, nil)
	})
	r.Handle("bad", func(context.Context, []byte) Response { return JSON(200, json.RawMessage("{nope")) })
	r.Handle("unmarshalable", func(context.Context, []byte) Response { return JSON(200, func() {}) })
	r.Handle("empty", func(context.Context, []byte) Response { return Response{} })
	r.Handle("after", func(context.Context, []byte) Response {
		return Response{Status: 202, Body: map[string]string{"status": "ok"}, After: func() { afterRan = true }}
	})
	r.Handle("refuse", func(context.Context, []byte) Response { return Error(409, "busy %d", 7) })

	tests := []struct {
		name, method, payload string
		status                int
		body                  string
	}{
		{"echo", "echo", `{"a":1}`, 200, `{"a":1}`},
		{"unknown", "nope", ``, 404, `{"error":"unknown method nope"}`},
		{"panic", "panics", ``, 500, `{"error":"method panics failed: internal error"}`},
		{"slow", "slow", ``, 504, `{"error":"method slow did not answer in 200ms"}`},
		{"invalid raw json", "bad", ``, 500, `{"error":"internal error: handler answered invalid JSON"}`},
		{"unmarshalable", "unmarshalable", ``, 500, `{"error":"internal error: handler answer is not JSON"}`},
		{"empty response", "empty", ``, 200, `{}`},
		{"after hook", "after", ``, 202, `{"status":"ok"}`},
		{"error helper", "refuse", ``, 409, `{"error":"busy 7"}`},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			resp := r.ServeMethod(context.Background(), tc.method, []byte(tc.payload))
			st, body := resp.Encode()
			if st != tc.status || string(body) != tc.body {
				t.Fatalf("ServeMethod(%s) = %d %s, want %d %s", tc.method, st, body, tc.status, tc.body)
			}
			if !json.Valid(body) {
				t.Fatalf("body %q is not JSON", body)
			}
			if resp.After != nil {
				resp.After()
			}
		})
	}
	if !afterRan {
		t.Fatal("after hook was not returned")
	}
	if got := r.Methods(); len(got) != 8 || got[0] != "after" {
		t.Fatalf("Methods() = %v", got)
	}
}

func FuzzServeMethod(f *testing.F) {
	f.Add("echo", []byte(`{"fwPackageUri":"https://x"}`))
	f.Add("nope", []byte(``))
	f.Add("echo", []byte("\xff"))
	r := New(nil, time.Second)
	r.Handle("echo", func(_ context.Context, p []byte) Response {
		var v any
		if err := json.Unmarshal(p, &v); err != nil {
			return Error(400, "payload: %v", err)
		}
		return JSON(200, v)
	})
	f.Fuzz(func(t *testing.T, name string, payload []byte) {
		st, body := r.ServeMethod(context.Background(), name, payload).Encode()
		if st < 100 || st > 999 || !json.Valid(body) {
			t.Fatalf("ServeMethod(%q, %q) = %d %q", name, payload, st, body)
		}
	})
}
