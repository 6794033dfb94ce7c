package provision

import (
	"context"
	"encoding/base64"
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"

	"go.uber.org/zap/zaptest"

	"github.com/gwagent/gwagent/hub"
	"github.com/gwagent/gwagent/iothub"
	"github.com/gwagent/gwagent/iothub/dps"
	"github.com/gwagent/gwagent/iothub/service"
)

const groupKey = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY="

// startHub starts gwhub's hub (and its DPS side) with an enrollment group.
func startHub(t *testing.T, status string) (*hub.Hub, *service.Client) {
	t.Helper()
	h, err := hub.New(hub.Config{StateDir: t.TempDir(), MQTTAddr: "127.0.0.1:0", HTTPSAddr: "127.0.0.1:0", Log: zaptest.NewLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	if err := h.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = h.Close() })
	cs, _ := iothub.ParseConnectionString(h.DPSConnectionString())
	svc, err := service.NewDPS(cs, service.Options{BaseURL: "https://" + h.HTTPSAddr(), CAFile: h.CAFile()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(svc.CloseIdleConnections)
	_, err = svc.PutEnrollmentGroup(context.Background(), dps.EnrollmentGroup{EnrollmentGroupID: "factory", ProvisioningStatus: status,
		Attestation: dps.AttestationMechanism{Type: dps.AttestationSymmetricKey, SymmetricKey: &dps.SymmetricKey{PrimaryKey: groupKey}}}, "")
	if err != nil {
		t.Fatal(err)
	}
	return h, svc
}

func cfgFor(h *hub.Hub, regID, groupKey string) Config {
	k, _ := dps.DeriveKeyBase64(groupKey, regID)
	key, _ := base64.StdEncoding.DecodeString(k)
	return Config{IDScope: h.IDScope(), GlobalEndpoint: "localhost", Address: h.MQTTAddr(), RegistrationID: regID,
		Key: key, ModelID: "dtmi:gwagent:Gateway;1", RootCAs: h.RootCAs(), Timeout: 20 * time.Second}
}

func TestRegisterWithGroupKeyAndKeepTheAssignment(t *testing.T) {
	h, svc := startHub(t, "enabled")
	a, err := Register(context.Background(), cfgFor(h, "gw-42", groupKey))
	if err != nil {
		t.Fatalf("Register: %v", err)
	}
	if a.AssignedHub != "localhost" || a.DeviceID != "gw-42" || a.IDScope != h.IDScope() {
		t.Fatalf("assignment %+v", a)
	}
	// The hub now has the device with the derived key.
	if _, err := h.Twin("gw-42"); err != nil {
		t.Fatalf("device not created: %v", err)
	}
	st, err := svc.Registration(context.Background(), "gw-42")
	if err != nil || st.Status != dps.StatusAssigned {
		t.Fatalf("registration state %+v, %v", st, err)
	}

	dir := t.TempDir()
	if _, ok, err := Load(dir); ok || err != nil {
		t.Fatalf("Load of nothing: %v %v", ok, err)
	}
	if err := Save(dir, a); err != nil {
		t.Fatal(err)
	}
	fi, _ := os.Stat(filepath.Join(dir, AssignmentFile))
	if fi.Mode().Perm() != 0o600 {
		t.Fatalf("assignment file mode %v", fi.Mode())
	}
	b, ok, err := Load(dir)
	if !ok || err != nil || b.ConnectionString().String() != a.ConnectionString().String() {
		t.Fatalf("Load = %+v %v %v", b, ok, err)
	}
}

func TestRegisterErrorsNameTheCause(t *testing.T) {
	h, _ := startHub(t, "enabled")
	ctx := context.Background()
	wrong := cfgFor(h, "gw-43", "MTExMTExMTExMTExMTExMTExMTExMTExMTExMTExMTE=")
	if _, err := Register(ctx, wrong); !errors.Is(err, ErrRefused) {
		t.Fatalf("wrong group key: %v", err)
	}
	scope := cfgFor(h, "gw-43", groupKey)
	scope.IDScope = "0neFFFFFFFF"
	if _, err := Register(ctx, scope); !errors.Is(err, ErrRefused) {
		t.Fatalf("unknown scope: %v", err)
	}
	down := cfgFor(h, "gw-43", groupKey)
	down.Address = "127.0.0.1:1"
	if _, err := Register(ctx, down); err == nil || errors.Is(err, ErrRefused) {
		t.Fatalf("DPS down: %v", err)
	}

	h2, _ := startHub(t, "disabled")
	if _, err := Register(ctx, cfgFor(h2, "gw-44", groupKey)); !errors.Is(err, ErrDisabled) {
		t.Fatalf("disabled group: %v", err)
	}
}
