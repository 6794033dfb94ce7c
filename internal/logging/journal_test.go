package logging

import (
	"errors"
	"fmt"
	"maps"
	"strings"
	"testing"
	"time"

	"github.com/coreos/go-systemd/v22/journal"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"
)

func TestFieldName(t *testing.T) {
	tests := []struct{ key, want string }{
		{"update_id", "UPDATE_ID"},
		{"phase", "PHASE"},
		{"device_id", "DEVICE_ID"},
		{"bytes", "BYTES"},
		{"updateId", "UPDATE_ID"},
		{"UpdateID", "UPDATE_ID"},
		{"HTTPStatus", "HTTP_STATUS"},
		{"errorVerbose", "ERROR_VERBOSE"},
		{"sha256", "SHA256"},
		{"http2Conn", "HTTP2_CONN"},
		{"UPDATE_ID", "UPDATE_ID"},
		{"update-id", "UPDATE_ID"},
		{"update.id", "UPDATE_ID"},
		{"update  id", "UPDATE_ID"},
		{"_private", "PRIVATE"},
		{"__", "FIELD"},
		{"", "FIELD"},
		{"2fa", "FIELD_2FA"},
		{"größe", "GR_E"},
		{"message", "FIELD_MESSAGE"},
		{"priority", "FIELD_PRIORITY"},
		{"logger", "FIELD_LOGGER"},
		{"code_line", "FIELD_CODE_LINE"},
		{"syslogIdentifier", "FIELD_SYSLOG_IDENTIFIER"},
		{strings.Repeat("a", 70), strings.Repeat("A", 64)},
		{strings.Repeat("a", 63) + "_b", strings.Repeat("A", 63)},
	}
	for _, tt := range tests {
		t.Run(tt.key, func(t *testing.T) {
			got := FieldName(tt.key)
			if got != tt.want {
				t.Fatalf("FieldName(%q) = %q, want %q", tt.key, got, tt.want)
			}
			if !validJournalName(got) {
				t.Fatalf("FieldName(%q) = %q is not a name journald accepts", tt.key, got)
			}
		})
	}
}

// validJournalName is journald's own rule (journal_field_valid), restated.
func validJournalName(s string) bool {
	if s == "" || len(s) > 64 || s[0] == '_' || (s[0] >= '0' && s[0] <= '9') {
		return false
	}
	for _, c := range []byte(s) {
		if (c < 'A' || c > 'Z') && (c < '0' || c > '9') && c != '_' {
			return false
		}
	}
	return true
}

func FuzzFieldName(f *testing.F) {
	for _, s := range []string{"update_id", "HTTPStatus", "", "_", "9", "message", "a.b-c d"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, key string) {
		if got := FieldName(key); !validJournalName(got) || reserved[got] {
			t.Fatalf("FieldName(%q) = %q", key, got)
		}
	})
}

func TestPriority(t *testing.T) {
	tests := []struct {
		level zapcore.Level
		want  journal.Priority
	}{
		{zapcore.DebugLevel, 7},
		{zapcore.InfoLevel, 6},
		{zapcore.WarnLevel, 4},
		{zapcore.ErrorLevel, 3},
		{zapcore.DPanicLevel, 2},
		{zapcore.PanicLevel, 2},
		{zapcore.FatalLevel, 2},
	}
	for _, tt := range tests {
		if got := Priority(tt.level); got != tt.want {
			t.Errorf("Priority(%v) = %d, want %d", tt.level, got, tt.want)
		}
	}
}

// sent is one call of the send seam.
type sent struct {
	msg  string
	pri  journal.Priority
	vars map[string]string
}

type fakeJournal struct {
	entries []sent
	err     error
}

func (f *fakeJournal) send(msg string, pri journal.Priority, vars map[string]string) error {
	f.entries = append(f.entries, sent{msg, pri, maps.Clone(vars)})
	return f.err
}

type stringer struct{}

func (stringer) String() string { return "from String" }

type object struct{}

func (object) MarshalLogObject(enc zapcore.ObjectEncoder) error {
	enc.AddString("slot", "b")
	enc.AddInt("percent", 42)
	return nil
}

func TestJournalCoreFields(t *testing.T) {
	ts := time.Date(2026, 11, 26, 1, 2, 3, 400000000, time.UTC)
	tests := []struct {
		name   string
		log    func(*zap.Logger)
		pri    journal.Priority
		msg    string
		fields map[string]string // without CODE_* and SYSLOG_IDENTIFIER
	}{
		{
			name: "stable names",
			log: func(l *zap.Logger) {
				l.Info("update accepted", zap.String("update_id", "u-1"), zap.String("phase", "accepted"),
					zap.Int64("bytes", 1234), zap.String("device_id", "gw-7"))
			},
			pri: 6,
			msg: "update accepted update_id=u-1 phase=accepted bytes=1234 device_id=gw-7",
			fields: map[string]string{"UPDATE_ID": "u-1", "PHASE": "accepted", "BYTES": "1234",
				"DEVICE_ID": "gw-7"},
		},
		{
			name: "types",
			log: func(l *zap.Logger) {
				l.Warn("slow", zap.Bool("ok", false), zap.Duration("elapsed", 1500*time.Millisecond),
					zap.Float64("ratio", 0.25), zap.Time("at", ts), zap.Uint8("u8", 255),
					zap.Binary("raw", []byte{0, 1, 2}), zap.Stringer("s", stringer{}),
					zap.Strings("list", []string{"a", "b"}), zap.Any("m", map[string]int{"x": 1}))
			},
			pri: 4,
			msg: `slow ok=false elapsed=1.5s ratio=0.25 at=2026-11-26T01:02:03.4Z u8=255 raw=AAEC s="from String" list="[\"a\",\"b\"]" m="{\"x\":1}"`,
			fields: map[string]string{"OK": "false", "ELAPSED": "1.5s", "RATIO": "0.25",
				"AT": "2026-11-26T01:02:03.4Z", "U8": "255", "RAW": "AAEC", "S": "from String",
				"LIST": `["a","b"]`, "M": `{"x":1}`},
		},
		{
			name: "error",
			log: func(l *zap.Logger) {
				l.Error("download failed", zap.Error(fmt.Errorf("firmware: get: %w", errors.New("404 Not Found"))))
			},
			pri:    3,
			msg:    `download failed error="firmware: get: 404 Not Found"`,
			fields: map[string]string{"ERROR": "firmware: get: 404 Not Found"},
		},
		{
			name: "namespace and object",
			log: func(l *zap.Logger) {
				l.Debug("progress", zap.String("phase", "downloading"), zap.Namespace("firmware"),
					zap.Object("detail", object{}), zap.String("updateId", "u-2"))
			},
			pri: 7,
			msg: "progress phase=downloading firmware.detail.percent=42 firmware.detail.slot=b firmware.updateId=u-2",
			fields: map[string]string{"PHASE": "downloading", "FIRMWARE_DETAIL_PERCENT": "42",
				"FIRMWARE_DETAIL_SLOT": "b", "FIRMWARE_UPDATE_ID": "u-2"},
		},
		{
			name: "reserved and multi-line",
			log: func(l *zap.Logger) {
				l.Info("odd", zap.String("message", "mine"), zap.String("note", "two\nlines"), zap.String("empty", ""))
			},
			pri:    6,
			msg:    `odd message=mine note="two\nlines" empty=""`,
			fields: map[string]string{"FIELD_MESSAGE": "mine", "NOTE": "two\nlines", "EMPTY": ""},
		},
		{
			name: "dpanic is critical and carries a stack",
			log: func(l *zap.Logger) {
				l.DPanic("invariant broken")
			},
			pri:    2,
			msg:    "invariant broken",
			fields: map[string]string{"STACKTRACE": "*"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			fj := &fakeJournal{}
			core := newJournalCore(zapcore.DebugLevel, "gwagent", fj.send, nil)
			tt.log(zap.New(core, zap.AddCaller(), zap.AddStacktrace(zapcore.DPanicLevel)))
			if len(fj.entries) != 1 {
				t.Fatalf("sent %d entries, want 1", len(fj.entries))
			}
			e := fj.entries[0]
			if e.msg != tt.msg {
				t.Errorf("MESSAGE = %q\nwant      %q", e.msg, tt.msg)
			}
			if e.pri != tt.pri {
				t.Errorf("PRIORITY = %d, want %d", e.pri, tt.pri)
			}
			if e.vars["SYSLOG_IDENTIFIER"] != "gwagent" {
				t.Errorf("SYSLOG_IDENTIFIER = %q", e.vars["SYSLOG_IDENTIFIER"])
			}
			if !strings.HasSuffix(e.vars["CODE_FILE"], "journal_test.go") || e.vars["CODE_LINE"] == "" ||
				!strings.Contains(e.vars["CODE_FUNC"], "TestJournalCoreFields") {
				t.Errorf("caller fields: FILE=%q LINE=%q FUNC=%q", e.vars["CODE_FILE"], e.vars["CODE_LINE"], e.vars["CODE_FUNC"])
			}
			got := maps.Clone(e.vars)
			for _, k := range []string{"SYSLOG_IDENTIFIER", "CODE_FILE", "CODE_LINE", "CODE_FUNC"} {
				delete(got, k)
			}
			if tt.fields["STACKTRACE"] == "*" {
				if !strings.Contains(got["STACKTRACE"], "TestJournalCoreFields") {
					t.Errorf("STACKTRACE = %q", got["STACKTRACE"])
				}
				got["STACKTRACE"] = "*"
			}
			if !maps.Equal(got, tt.fields) {
				t.Errorf("fields = %q\nwant     %q", got, tt.fields)
			}
			for k := range e.vars {
				if !validJournalName(k) {
					t.Errorf("field name %q would be refused by journald", k)
				}
			}
		})
	}
}

func TestJournalCoreContextAndLevel(t *testing.T) {
	fj := &fakeJournal{}
	lvl := zap.NewAtomicLevelAt(zapcore.InfoLevel)
	root := zap.New(newJournalCore(lvl, "gwagent", fj.send, nil))
	log := root.Named("agent").Named("session").With(zap.String("device_id", "gw-7"), zap.Namespace("hub"))
	log.Debug("not sent at info")
	log.Info("connected", zap.String("host", "localhost"))
	root.Info("no context")
	lvl.SetLevel(zapcore.DebugLevel)
	log.Debug("sent at debug")

	if len(fj.entries) != 3 {
		t.Fatalf("sent %d entries, want 3: %+v", len(fj.entries), fj.entries)
	}
	want := []sent{
		{"agent.session: connected device_id=gw-7 hub.host=localhost", 6,
			map[string]string{"SYSLOG_IDENTIFIER": "gwagent", "LOGGER": "agent.session", "DEVICE_ID": "gw-7", "HUB_HOST": "localhost"}},
		{"no context", 6, map[string]string{"SYSLOG_IDENTIFIER": "gwagent"}},
		{"agent.session: sent at debug device_id=gw-7", 7,
			map[string]string{"SYSLOG_IDENTIFIER": "gwagent", "LOGGER": "agent.session", "DEVICE_ID": "gw-7"}},
	}
	for i, w := range want {
		g := fj.entries[i]
		if g.msg != w.msg || g.pri != w.pri || !maps.Equal(g.vars, w.vars) {
			t.Errorf("entry %d = %+v\nwant %+v", i, g, w)
		}
	}
}

func TestJournalCoreFallback(t *testing.T) {
	fj := &fakeJournal{err: errors.New("sendmsg: connection refused")}
	obsCore, logs := observer.New(zapcore.DebugLevel)
	log := zap.New(newJournalCore(zapcore.DebugLevel, "gwagent", fj.send, obsCore)).With(zap.String("device_id", "gw-7"))
	log.Warn("journal gone", zap.String("update_id", "u-3"))

	if len(fj.entries) != 1 {
		t.Fatalf("send called %d times, want 1", len(fj.entries))
	}
	got := logs.All()
	if len(got) != 1 {
		t.Fatalf("fallback got %d entries, want 1", len(got))
	}
	if got[0].Message != "journal gone" || got[0].Level != zapcore.WarnLevel {
		t.Errorf("fallback entry = %+v", got[0].Entry)
	}
	ctx := got[0].ContextMap()
	if ctx["device_id"] != "gw-7" || ctx["update_id"] != "u-3" {
		t.Errorf("fallback fields = %v, want device_id and update_id", ctx)
	}
}

// BenchmarkJournalCore measures the encoding of a typical progress entry
// (everything but the socket write).
func BenchmarkJournalCore(b *testing.B) {
	send := func(string, journal.Priority, map[string]string) error { return nil }
	log := zap.New(newJournalCore(zapcore.InfoLevel, "gwagent", send, nil), zap.AddCaller()).
		Named("firmware").With(zap.String("device_id", "gw-7"))
	b.ReportAllocs()
	for b.Loop() {
		log.Info("update phase", zap.String("update_id", "17eabfc4-a0a5-43bf-8f11-b30cf682b103"),
			zap.String("phase", "downloading"), zap.Int64("bytes", 4200000), zap.Int("percent", 42))
	}
}
