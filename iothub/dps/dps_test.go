package dps

import (
	"testing"
	"time"
)

func TestDeriveKey(t *testing.T) {
	// openssl dgst -sha256 -mac HMAC -macopt hexkey:<hex of the key> -binary | base64
	got, err := DeriveKeyBase64("MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=", "gw-01")
	if err != nil || got != "N2kxoukXnr7/jEEXZ7W4emB1Uao6ksh9+CdAkKkKq4M=" {
		t.Fatalf("DeriveKeyBase64 = %q, %v", got, err)
	}
	if _, err := DeriveKeyBase64("not base64!", "gw-01"); err == nil {
		t.Fatal("a group key that is not base64 was accepted")
	}
}

func TestUsername(t *testing.T) {
	u := Username("0ne00ABCDEF", "gw-01", "gwagent/1.0 (linux)")
	if u != "0ne00ABCDEF/registrations/gw-01/api-version=2019-03-31&ClientVersion=gwagent%2F1.0+%28linux%29" {
		t.Fatalf("Username = %q", u)
	}
	for _, tc := range []struct {
		in, scope, reg string
		ok             bool
	}{
		{in: u, scope: "0ne00ABCDEF", reg: "gw-01", ok: true},
		// What azure-iot-provisioning-device-mqtt 1.8.1 sends.
		{in: "0ne1/registrations/a.b_c:d-1/api-version=2019-03-31&ClientVersion=azure-iot-provisioning-device%2F1.9.1", scope: "0ne1", reg: "a.b_c:d-1", ok: true},
		{in: "0ne1/registrations/gw/?api-version=2019-03-31", scope: "0ne1", reg: "gw", ok: true},
		{in: "localhost/gw-01/?api-version=2021-04-12"},
		{in: "0ne1/registrations/gw/ClientVersion=x"},
		{in: "0ne1/registrations/GW/api-version=1"},
		{in: "/registrations/gw/api-version=1"},
		{in: "0ne1/registrations//api-version=1"},
	} {
		info, err := ParseUsername(tc.in)
		if (err == nil) != tc.ok || tc.ok && (info.IDScope != tc.scope || info.RegistrationID != tc.reg) {
			t.Errorf("ParseUsername(%q) = %+v, %v", tc.in, info, err)
		}
	}
}

func TestTopics(t *testing.T) {
	r, err := ParseRequestTopic(RegisterTopic("7"))
	if err != nil || r.Kind != KindRegister || r.RID != "7" {
		t.Fatalf("register topic: %+v %v", r, err)
	}
	r, err = ParseRequestTopic(StatusTopic("8", "4.abc.def"))
	if err != nil || r.Kind != KindStatus || r.RID != "8" || r.OperationID != "4.abc.def" {
		t.Fatalf("status topic: %+v %v", r, err)
	}
	for _, bad := range []string{"$dps/registrations/GET/iotdps-get-operationstatus/?$rid=1", "$dps/registrations/PUT/iotdps-register/?x=1", "$iothub/twin/GET/?$rid=1"} {
		if _, err := ParseRequestTopic(bad); err == nil {
			t.Errorf("ParseRequestTopic(%q) accepted", bad)
		}
	}
	res, err := ParseResponseTopic(ResponseTopic(202, "1", 1500*time.Millisecond))
	if err != nil || res.Status != 202 || res.RID != "1" || res.RetryAfter != 2*time.Second {
		t.Fatalf("response topic: %+v %v", res, err)
	}
	res, err = ParseResponseTopic("$dps/registrations/res/401/?$rid=3")
	if err != nil || res.Status != 401 || res.RetryAfter != 0 {
		t.Fatalf("401 topic: %+v %v", res, err)
	}
	if _, err := ParseResponseTopic("$dps/registrations/res/abc/?$rid=3"); err == nil {
		t.Fatal("status abc accepted")
	}
}

func FuzzParseUsername(f *testing.F) {
	f.Add("0ne1/registrations/gw/api-version=2019-03-31")
	f.Fuzz(func(t *testing.T, s string) {
		info, err := ParseUsername(s)
		if err == nil && (!ValidRegistrationID(info.RegistrationID) || info.IDScope == "") {
			t.Fatalf("accepted %q as %+v", s, info)
		}
	})
}
