package iothub

import (
	"encoding/base64"
	"encoding/json"
	"errors"
	"net/url"
	"reflect"
	"strings"
	"testing"
	"time"
)

// Key and expiry of the protocol reference's test vectors (§1.4).
var (
	vectorKey, _ = base64.StdEncoding.DecodeString("AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=")
	vectorExpiry = time.Unix(1700000000, 0)
)

func TestSASVectors(t *testing.T) {
	tests := []struct {
		name, sr, sig, skn string
	}{
		{"upper-case encoding", "myhub.azure-devices.net%2Fdevices%2Fdev1", "i%2BYmMcSSZc4KzBi6ejz3l0iL%2B2sN0CE3q6vSm837h2g%3D", ""},
		{"lower-case encoding", "myhub.azure-devices.net%2fdevices%2fdev1", "dUk3ecSsggNPeQNG98fO6Pv16mCcXEgP6lT2QfotQ4s%3D", ""},
		{"C SDK raw", "myhub.azure-devices.net/devices/dev1", "MXrV7dIYA4Nv1boM3d4kgQQtxA3MyMN%2FBRPwZ8fvsA0%3D", ""},
		{"module", "myhub.azure-devices.net%2Fdevices%2Fdev1%2Fmodules%2Fmod1", "kA6xjFLkZvk4Cdh0nD8uWAzassq6PB47f7BepMMtmlY%3D", ""},
		{"service", "myhub.azure-devices.net", "iIzEw6hi6GK79RY5jNXO6QeQkSL%2FAx4zTmy44X2G1VY%3D", "iothubowner"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			tok := "SharedAccessSignature sr=" + tc.sr + "&sig=" + tc.sig + "&se=1700000000"
			if tc.skn != "" {
				tok += "&skn=" + tc.skn
			}
			s, err := ParseSAS(tok)
			if err != nil {
				t.Fatal(err)
			}
			if err := s.Verify(vectorKey); err != nil {
				t.Fatalf("Verify: %v", err)
			}
			wrong := append([]byte(nil), vectorKey...)
			wrong[0] ^= 1
			if err := s.Verify(wrong); !errors.Is(err, ErrSASSignature) {
				t.Fatalf("Verify with a wrong key = %v, want ErrSASSignature", err)
			}
			if s.KeyName != tc.skn || !s.Expiry.Equal(vectorExpiry) {
				t.Fatalf("parsed %+v", s)
			}
		})
	}
}

func TestNewSASMatchesVectors(t *testing.T) {
	dev := NewSAS(DeviceResource("myhub.azure-devices.net", "dev1"), vectorKey, "", vectorExpiry)
	want := "SharedAccessSignature sr=myhub.azure-devices.net%2Fdevices%2Fdev1&sig=i%2BYmMcSSZc4KzBi6ejz3l0iL%2B2sN0CE3q6vSm837h2g%3D&se=1700000000"
	if dev != want {
		t.Fatalf("device token\n got %s\nwant %s", dev, want)
	}
	svc := NewSAS("myhub.azure-devices.net", vectorKey, "iothubowner", vectorExpiry)
	if !strings.Contains(svc, "sig=iIzEw6hi6GK79RY5jNXO6QeQkSL%2FAx4zTmy44X2G1VY%3D") || !strings.HasSuffix(svc, "&skn=iothubowner") {
		t.Fatalf("service token %s", svc)
	}
}

func TestSASCoversAndExpiry(t *testing.T) {
	s, err := ParseSAS(NewSAS("MyHub.example.net/devices/dev1", vectorKey, "", vectorExpiry))
	if err != nil {
		t.Fatal(err)
	}
	for res, want := range map[string]bool{
		"myhub.example.net/devices/dev1":              true,
		"myhub.example.net/devices/dev1/modules/m1":   true,
		"myhub.example.net/devices/dev10":             false,
		"myhub.example.net/devices":                   false,
		"other.example.net/devices/dev1":              false,
		"myhub.example.net/devices/DEV1":              false,
		"myhub.example.net/devices/dev1/":             true,
		"myhub.example.net/devices/dev1/modules/m1/x": true,
	} {
		if got := s.Covers(res); got != want {
			t.Errorf("Covers(%q) = %v, want %v", res, got, want)
		}
	}
	if s.Expired(vectorExpiry.Add(-time.Second)) || !s.Expired(vectorExpiry) {
		t.Error("expiry is not checked against se")
	}
}

func TestParseSASErrors(t *testing.T) {
	for _, tok := range []string{
		"",
		"sr=a&sig=b&se=1",
		"SharedAccessSignature sr=a&se=1",
		"SharedAccessSignature sr=a&sig=!!!&se=1",
		"SharedAccessSignature sr=a&sig=AAAA&se=soon",
		"SharedAccessSignature sr=a&sig=AAAA&se=1&foo=bar",
		"SharedAccessSignature sr=a&sig=AAAA&se=1&se=2",
		"SharedAccessSignature sr=%zz&sig=AAAA&se=1",
	} {
		if _, err := ParseSAS(tok); !errors.Is(err, ErrSAS) {
			t.Errorf("ParseSAS(%q) = %v, want ErrSAS", tok, err)
		}
	}
}

func TestConnectionString(t *testing.T) {
	key := base64.StdEncoding.EncodeToString([]byte("0123456789abcdef"))
	tests := []struct {
		in      string
		wantErr string
		service bool
	}{
		{in: "HostName=h.example.net;DeviceId=gw-01;SharedAccessKey=" + key},
		{in: "HostName=h.example.net;DeviceId=gw-01;x509=true"},
		{in: "HostName=h.example.net;DeviceId=gw-01;SharedAccessKey=" + key + ";GatewayHostName=edge.local"},
		{in: "HostName=h.example.net;SharedAccessKeyName=iothubowner;SharedAccessKey=" + key, service: true},
		{in: "HostName=h.example.net;DeviceId=gw-01;SharedAccessSignature=SharedAccessSignature sr=x&sig=y&se=1"},
		{in: "DeviceId=gw-01;SharedAccessKey=" + key, wantErr: "HostName is missing"},
		{in: "HostName=h;SharedAccessKey=" + key, wantErr: "DeviceId is missing"},
		{in: "HostName=h;DeviceId=d", wantErr: "one of SharedAccessKey"},
		{in: "HostName=h;DeviceId=d;x509=true;SharedAccessKey=" + key, wantErr: "exclude each other"},
		{in: "HostName=h;DeviceId=d;x509=yes", wantErr: "x509 must be"},
		{in: "HostName=h;DeviceId=d;SharedAccessKey=not base64!", wantErr: "not base64"},
		{in: "HostName=h;HostName=i;DeviceId=d;x509=true", wantErr: "given twice"},
		{in: "HostName=h;garbage", wantErr: "not key=value"},
		{in: "HostName=h;SharedAccessKeyName=owner", wantErr: "needs SharedAccessKey"},
	}
	for _, tc := range tests {
		c, err := ParseConnectionString(tc.in)
		if tc.wantErr != "" {
			if err == nil || !errors.Is(err, ErrConnectionString) || !strings.Contains(err.Error(), tc.wantErr) {
				t.Errorf("%q: err = %v, want %q", tc.in, err, tc.wantErr)
			}
			continue
		}
		if err != nil {
			t.Errorf("%q: %v", tc.in, err)
			continue
		}
		if c.IsService() != tc.service {
			t.Errorf("%q: IsService = %v", tc.in, c.IsService())
		}
		again, err := ParseConnectionString(c.String())
		if err != nil || again != c {
			t.Errorf("%q: String round trip gave %+v, %v", tc.in, again, err)
		}
	}
}

func TestUsername(t *testing.T) {
	u := Username("h.example.net", "gw-01", "gwagent/1.0 (linux)")
	if u != "h.example.net/gw-01/?api-version=2021-04-12&DeviceClientType=gwagent%2F1.0+%28linux%29" {
		t.Fatalf("Username = %s", u)
	}
	tests := []struct {
		in              string
		dev, mod, apiV  string
		clientType, err string
	}{
		{in: u, dev: "gw-01", apiV: APIVersion, clientType: "gwagent/1.0+(linux)"},
		{in: "h/d/api-version=2020-09-30", dev: "d", apiV: "2020-09-30"},
		{in: "h/d/m/?api-version=2020-09-30&model-id=dtmi%3Ax%3By%3B1", dev: "d", mod: "m", apiV: "2020-09-30"},
		{in: "localhost/dev/?api-version=2021-04-12&DeviceClientType=azure-iot-device%2F1.18.4%20(node)", dev: "dev", apiV: "2021-04-12", clientType: "azure-iot-device/1.18.4 (node)"},
		{in: "h/d/?DeviceClientType=x", err: "api-version"},
		{in: "h/d", err: "property bag"},
		{in: "h//?api-version=1", err: "empty segment"},
		{in: "h/?api-version=1", err: "host/deviceId"},
		{in: "h/a/b/c/?api-version=1", err: "host/deviceId"},
	}
	for _, tc := range tests {
		info, err := ParseUsername(tc.in)
		if tc.err != "" {
			if err == nil || !strings.Contains(err.Error(), tc.err) {
				t.Errorf("%q: err = %v, want %q", tc.in, err, tc.err)
			}
			continue
		}
		if err != nil {
			t.Errorf("%q: %v", tc.in, err)
			continue
		}
		if info.DeviceID != tc.dev || info.ModuleID != tc.mod || info.Props["api-version"] != tc.apiV || info.Props["DeviceClientType"] != tc.clientType {
			t.Errorf("%q: parsed %+v", tc.in, info)
		}
	}
}

func TestTopicsRoundTrip(t *testing.T) {
	tests := []struct {
		topic string
		want  Topic
	}{
		{MethodRequestTopic("firmwareUpdate", "1"), Topic{Kind: KindMethodRequest, Method: "firmwareUpdate", RID: "1"}},
		{MethodResponseTopic(200, "a+b c"), Topic{Kind: KindMethodResponse, Status: 200, RID: "a+b c"}},
		{TwinGetTopic("x7"), Topic{Kind: KindTwinGet, RID: "x7"}},
		{TwinReportedTopic("5"), Topic{Kind: KindTwinReported, RID: "5"}},
		{TwinResponseTopic(204, "5", 6), Topic{Kind: KindTwinResponse, Status: 204, RID: "5", Version: 6}},
		{TwinResponseTopic(429, "5", 0), Topic{Kind: KindTwinResponse, Status: 429, RID: "5"}},
		{DesiredPatchTopic(8), Topic{Kind: KindDesiredPatch, Version: 8}},
		{TelemetryTopic("gw-01"), Topic{Kind: KindTelemetry, DeviceID: "gw-01"}},
		{"devices/gw-01/messages/events/%24.ct=application%2Fjson&k=v", Topic{Kind: KindTelemetry, DeviceID: "gw-01"}},
		{"devices/d/modules/m/messages/events/", Topic{Kind: KindTelemetry, DeviceID: "d", ModuleID: "m"}},
		{"devices/d/messages/devicebound/%24.to=%2Fdevices%2Fd%2FmessagesdeviceBound", Topic{Kind: KindC2D, DeviceID: "d"}},
	}
	for _, tc := range tests {
		got, err := ParseTopic(tc.topic)
		if err != nil {
			t.Errorf("ParseTopic(%q): %v", tc.topic, err)
			continue
		}
		got.Props = nil
		if !reflect.DeepEqual(got, tc.want) {
			t.Errorf("ParseTopic(%q) = %+v, want %+v", tc.topic, got, tc.want)
		}
	}
	if got := TwinResponseTopic(204, "1", 6); got != "$iothub/twin/res/204/?$rid=1&$version=6" {
		t.Errorf("TwinResponseTopic = %s (the documented example is $iothub/twin/res/204/?$rid=1&$version=6)", got)
	}
	if p, _ := ParseTopic("devices/d/messages/events/%24.ct=application%2Fjson&k=a+b"); p.Props["$.ct"] != "application/json" || p.Props["k"] != "a+b" {
		t.Errorf("telemetry props = %v", p.Props)
	}
}

func TestParseTopicErrors(t *testing.T) {
	for _, topic := range []string{
		"", "foo/bar", "$iothub/twin/GET/", "$iothub/twin/GET/?$rid=", "$iothub/twin/res/20/?$rid=1",
		"$iothub/twin/res/abc/?$rid=1", "$iothub/methods/POST//?$rid=1", "$iothub/methods/POST/a/b/?$rid=1",
		"$iothub/twin/PATCH/properties/desired/?", "$iothub/twin/PATCH/properties/desired/?$version=x",
		"$iothub/twin/PATCH/properties/other/?$rid=1", "devices//messages/events/", "devices/d/other/",
		"devices/d/messages/events/a/b", "$iothub/twin/GET/?$rid=%zz",
	} {
		if _, err := ParseTopic(topic); !errors.Is(err, ErrTopic) {
			t.Errorf("ParseTopic(%q) = %v, want ErrTopic", topic, err)
		}
	}
}

func TestServiceErrorBody(t *testing.T) {
	b := ErrorBody(CodeDeviceNotOnline, "device is not online", map[string]any{"timeout": "00:00:00"})
	var outer map[string]string
	if err := json.Unmarshal(b, &outer); err != nil {
		t.Fatal(err)
	}
	if _, ok := outer["ExceptionMessage"]; !ok || !strings.Contains(outer["Message"], `"errorCode":404103`) {
		t.Fatalf("body %s", b)
	}
	e := ParseServiceError(404, b)
	if e.Code != CodeDeviceNotOnline || e.Message != "device is not online" || e.Temporary() {
		t.Fatalf("parsed %+v", e)
	}
	if e := ParseServiceError(429, TwinErrorBody(CodeThrottlingException, "slow down")); e.Code != CodeThrottlingException || !e.Temporary() {
		t.Fatalf("flat body parsed %+v", e)
	}
	if e := ParseServiceError(502, []byte("bad gateway")); e.Code != 0 || e.Message != "bad gateway" {
		t.Fatalf("text body parsed %+v", e)
	}
}

func TestIdentifiers(t *testing.T) {
	for name, want := range map[string]bool{"firmwareUpdate": true, "comp*cmd": true, "": false, "a/b": false, "a b": false, "a$": false, "é": false} {
		if ValidMethodName(name) != want {
			t.Errorf("ValidMethodName(%q) != %v", name, want)
		}
	}
	for id, want := range map[string]bool{"gw-01": true, "a:b.c_d": true, "": false, "a/b": false, "a b": false, strings.Repeat("a", 129): false} {
		if ValidDeviceID(id) != want {
			t.Errorf("ValidDeviceID(%q) != %v", id, want)
		}
	}
}

func FuzzParseTopic(f *testing.F) {
	for _, s := range []string{MethodRequestTopic("m", "1"), TwinResponseTopic(204, "1", 2), DesiredPatchTopic(3), TelemetryTopic("d") + "a=b", "$iothub/twin/res/200/?$rid=%41"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		tp, err := ParseTopic(s)
		if err != nil {
			return
		}
		// A parsed request/response topic re-encodes to something that parses the same way.
		var again string
		switch tp.Kind {
		case KindMethodRequest:
			again = MethodRequestTopic(tp.Method, tp.RID)
		case KindTwinResponse:
			again = TwinResponseTopic(tp.Status, tp.RID, tp.Version)
		default:
			return
		}
		tp2, err := ParseTopic(again)
		if err != nil || tp2.Kind != tp.Kind || tp2.RID != tp.RID || tp2.Method != tp.Method || tp2.Status != tp.Status {
			t.Fatalf("%q → %q: %+v vs %+v (%v)", s, again, tp, tp2, err)
		}
	})
}

func FuzzParseProps(f *testing.F) {
	f.Add("$rid=1&$version=2")
	f.Add("a&b=&c=%2B+")
	f.Fuzz(func(t *testing.T, s string) {
		p, err := ParseProps(s)
		if err != nil {
			return
		}
		q, err := ParseProps(p.Encode())
		if err != nil || len(q) != len(p) {
			t.Fatalf("%q → %q: %v %v", s, p.Encode(), q, err)
		}
		for k, v := range p {
			if q[k] != v {
				t.Fatalf("%q: key %q: %q != %q", s, k, q[k], v)
			}
		}
	})
}

func FuzzParseSAS(f *testing.F) {
	f.Add(NewSAS("h/devices/d", vectorKey, "", vectorExpiry))
	f.Add("SharedAccessSignature sr=h&sig=AAAA&se=1&skn=x")
	f.Fuzz(func(t *testing.T, s string) {
		tok, err := ParseSAS(s)
		if err != nil {
			return
		}
		if _, err := url.PathUnescape(tok.RawResource); err != nil {
			t.Fatalf("accepted an undecodable sr %q", tok.RawResource)
		}
		_ = tok.Verify(vectorKey)
		_ = tok.Covers("h/devices/d")
	})
}

func FuzzParseConnectionString(f *testing.F) {
	f.Add("HostName=h.example.net;DeviceId=gw-01;SharedAccessKey=AAAA")
	f.Add("HostName=h;SharedAccessKeyName=o;SharedAccessKey=AAAA")
	f.Fuzz(func(t *testing.T, s string) {
		c, err := ParseConnectionString(s)
		if err != nil {
			return
		}
		again, err := ParseConnectionString(c.String())
		if err != nil || again != c {
			t.Fatalf("%q: round trip %+v %v", s, again, err)
		}
	})
}

func FuzzParseUsername(f *testing.F) {
	f.Add(Username("h", "d", "x"))
	f.Add("h/d/m/api-version=1")
	f.Fuzz(func(t *testing.T, s string) {
		info, err := ParseUsername(s)
		if err != nil {
			return
		}
		if info.DeviceID == "" || info.Host == "" || info.Props["api-version"] == "" {
			t.Fatalf("%q parsed to %+v", s, info)
		}
	})
}
