package service

import (
	"encoding/json"
	"strings"
	"testing"
	"time"
)

func TestParseFirmwareState(t *testing.T) {
	cases := []struct {
		name, doc   string
		status      string
		percent     int
		bytes       int64
		errCode     string
		transition  string
		updateID    string
		currentVers string
	}{
		{"gwagent", `{"firmwareStatus":"downloading","downloadComplete":"2026-11-26T12:00:01Z","firmware":{"status":"downloading","updateId":"u-1","bytes":4200000,"totalBytes":10000000,"percent":42,"updatedAt":"2026-11-26T12:00:02.5Z","currentVersion":"1.2.0"}}`,
			"downloading", 42, 4200000, "", "12:00:01", "u-1", "1.2.0"},
		{"percent from bytes", `{"firmware":{"status":"downloading","bytes":1,"totalBytes":3,"percent":null,"updatedAt":"2026-11-26T12:00:02Z"}}`,
			"downloading", 33, 1, "", "12:00:02", "", ""},
		{"huge bytes", `{"firmware":{"status":"downloading","bytes":9000000000000000000,"totalBytes":9100000000000000000}}`,
			"downloading", 98, 9000000000000000000, "", "", "", ""},
		{"numeric error code", `{"firmwareStatus":"failed","firmware":{"status":"failed","error":{"code":500,"message":"boom"},"updatedAt":"2026-11-26T12:00:09Z"}}`,
			"failed", -1, 0, "500", "12:00:09", "", ""},
		{"tutorial python time", `{"firmwareStatus":"applying","startedApplyingImage":"2018-02-16 10:00:00.123456"}`,
			"applying", -1, 0, "", "10:00:00", "", ""},
		{"metadata only", `{"firmwareStatus":"standBy","$metadata":{"firmwareStatus":{"$lastUpdated":"2026-11-26T11:00:00.1234567Z"}}}`,
			"standBy", -1, 0, "", "11:00:00", "", ""},
		{"wrong types", `{"firmwareStatus":7,"firmware":{"bytes":"x","totalBytes":-5,"percent":400,"error":"e"}}`,
			"7", -1, 0, "", "", "", ""},
		{"empty", `{}`, "", -1, 0, "", "", "", ""},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			dec := json.NewDecoder(strings.NewReader(tc.doc))
			dec.UseNumber()
			var m map[string]any
			if err := dec.Decode(&m); err != nil {
				t.Fatal(err)
			}
			s := ParseFirmwareState(m)
			if s.Status != tc.status || s.Percent != tc.percent || s.Bytes != tc.bytes || s.UpdateID != tc.updateID || s.CurrentVersion != tc.currentVers {
				t.Errorf("got %+v", s)
			}
			if (s.Error == nil) != (tc.errCode == "") || (s.Error != nil && s.Error.Code != tc.errCode) {
				t.Errorf("error %+v, want code %q", s.Error, tc.errCode)
			}
			got := ""
			if tt := s.TransitionTime(); !tt.IsZero() {
				got = tt.UTC().Format(time.TimeOnly)
			}
			if got != tc.transition {
				t.Errorf("transition time %q, want %q", got, tc.transition)
			}
		})
	}
}

func TestParseFirmwareWindow(t *testing.T) {
	var rep map[string]any
	doc := `{"firmwareStatus":"waitingForWindow","firmware":{"status":"waitingForWindow","window":{"start":"02:00","duration":"2h0m0s","timeZone":"Europe/Berlin","opensAt":"2026-12-04T01:00:00.000Z"}}}`
	if err := json.Unmarshal([]byte(doc), &rep); err != nil {
		t.Fatal(err)
	}
	s := ParseFirmwareState(rep)
	want := FirmwareWindow{Start: "02:00", Duration: "2h0m0s", TimeZone: "Europe/Berlin", OpensAt: time.Date(2026, 12, 4, 1, 0, 0, 0, time.UTC)}
	if s.Status != StatusWaitingForWindow || s.Window == nil || s.Window.Start != want.Start || s.Window.Duration != want.Duration ||
		s.Window.TimeZone != want.TimeZone || !s.Window.OpensAt.Equal(want.OpensAt) || s.Terminal() {
		t.Fatalf("parsed %+v window %+v, want %+v", s, s.Window, want)
	}
	rep["firmware"].(map[string]any)["window"] = nil
	if s := ParseFirmwareState(rep); s.Window != nil {
		t.Fatalf("window null parsed as %+v", s.Window)
	}
}

func TestParseFirmwareAdaptive(t *testing.T) {
	for _, tc := range []struct {
		name string
		doc  string
		want *FirmwareAdaptive
	}{
		{"adaptive", `{"firmwareStatus":"downloading","firmware":{"adaptive":{"bytesFetched":2359296,"bytesReused":264241152,"fallback":null}}}`,
			&FirmwareAdaptive{BytesFetched: 2359296, BytesReused: 264241152}},
		{"fallback", `{"firmwareStatus":"downloading","firmware":{"adaptive":{"bytesFetched":10,"bytesReused":0,"fallback":"the server ignores Range requests"}}}`,
			&FirmwareAdaptive{BytesFetched: 10, Fallback: "the server ignores Range requests"}},
		{"null", `{"firmwareStatus":"downloading","firmware":{"adaptive":null}}`, nil},
		{"absent", `{"firmwareStatus":"downloading","firmware":{"bytes":5}}`, nil},
		{"mistyped counts stay zero", `{"firmwareStatus":"downloading","firmware":{"adaptive":{"bytesFetched":"x","bytesReused":1.5}}}`,
			&FirmwareAdaptive{}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var rep map[string]any
			if err := json.Unmarshal([]byte(tc.doc), &rep); err != nil {
				t.Fatal(err)
			}
			got := ParseFirmwareState(rep).Adaptive
			if (got == nil) != (tc.want == nil) || got != nil && *got != *tc.want {
				t.Fatalf("adaptive %+v, want %+v", got, tc.want)
			}
		})
	}
}
