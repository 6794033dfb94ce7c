package agent

import (
	"context"
	"errors"
	"fmt"

	"go.uber.org/zap"

	"github.com/gwagent/gwagent/agent/config"
	"github.com/gwagent/gwagent/agent/provision"
	"github.com/gwagent/gwagent/internal/buildinfo"
	"github.com/gwagent/gwagent/iothub"
)

// provisioner is the session's identity source when the agent provisions
// itself: the kept assignment if there is one, DPS otherwise and whenever
// the hub refuses the identity. It runs on the session's loop goroutine.
type provisioner struct {
	cfg      *config.Config
	stateDir string
	log      *zap.Logger
}

func (p *provisioner) identity(ctx context.Context, rejected error) (iothub.ConnectionString, error) {
	pc := p.cfg.Provisioning
	kept, ok, err := provision.Load(p.stateDir)
	if err != nil {
		p.log.Warn("kept assignment unreadable; provisioning again", zap.Error(err))
		ok = false
	}
	if ok && (kept.IDScope != pc.IDScope || kept.RegistrationID != pc.RegistrationID) {
		p.log.Info("kept assignment is for another id scope or registration id; provisioning again",
			zap.String("kept_registration_id", kept.RegistrationID))
		ok = false
	}
	if ok && rejected == nil {
		p.log.Info("using the kept DPS assignment", zap.String("assigned_hub", kept.AssignedHub), zap.String("device_id", kept.DeviceID))
		return kept.ConnectionString(), nil
	}
	if rejected != nil {
		p.log.Warn("the hub refused the identity; provisioning again", zap.Error(rejected))
	}
	a, err := provision.Register(ctx, registerConfig(p.cfg, p.log))
	if err != nil {
		if ok && !errors.Is(err, provision.ErrRefused) && !errors.Is(err, provision.ErrDisabled) {
			// DPS is down or failing: the assignment that worked before is
			// tried again rather than dropped.
			p.log.Warn("DPS unreachable; keeping the previous assignment", zap.Error(err))
			return kept.ConnectionString(), nil
		}
		return iothub.ConnectionString{}, fmt.Errorf("provisioning (DPS %s, registration %s): %w", pc.GlobalEndpoint, pc.RegistrationID, err)
	}
	if err := provision.Save(p.stateDir, a); err != nil {
		p.log.Error("assignment not kept; the next start provisions again", zap.Error(err))
	}
	return a.ConnectionString(), nil
}

// registerConfig is how the configuration registers with DPS.
func registerConfig(cfg *config.Config, log *zap.Logger) provision.Config {
	pc := cfg.Provisioning
	return provision.Config{
		IDScope: pc.IDScope, GlobalEndpoint: pc.GlobalEndpoint, Address: pc.Address, RegistrationID: pc.RegistrationID,
		Key: pc.Key, Certificate: pc.Certificate, Payload: pc.Payload, ModelID: cfg.Hub.ModelID, RootCAs: cfg.Hub.RootCAs,
		// DPS is reached the way the hub is: same transport and proxy.
		Transport: cfg.Hub.Transport, WebSocketAddress: pc.WebSocketAddress, Proxy: hubProxy(cfg.Hub.Proxy),
		ClientType: "gwagent/" + buildinfo.Get().Version, Log: log,
	}
}

// ErrNotProvisioning is returned by Provision when the configuration does
// not provision the gateway (no provisioning.idScope, or a connection
// string, which wins).
var ErrNotProvisioning = errors.New("agent: the configuration does not provision through DPS")

// Provision is `gwagent provision`: it returns the kept assignment when
// there is one for this id scope and registration id, and registers with
// DPS otherwise, or always with force. The kept assignment is replaced only
// once the new registration succeeded, so a failed --force leaves the
// gateway with the identity that worked. fresh says DPS was asked.
func Provision(ctx context.Context, cfg *config.Config, log *zap.Logger, force bool) (a provision.Assignment, fresh bool, err error) {
	pc := cfg.Provisioning
	if pc.IDScope == "" || !pc.Attested() {
		return provision.Assignment{}, false, ErrNotProvisioning
	}
	kept, ok, err := provision.Load(cfg.StateDir)
	if err != nil {
		log.Warn("kept assignment unreadable; provisioning again", zap.Error(err))
		ok = false
	}
	if ok && !force && kept.IDScope == pc.IDScope && kept.RegistrationID == pc.RegistrationID {
		return kept, false, nil
	}
	a, err = provision.Register(ctx, registerConfig(cfg, log))
	if err != nil {
		return provision.Assignment{}, false, fmt.Errorf("provisioning (DPS %s, registration %s): %w", pc.GlobalEndpoint, pc.RegistrationID, err)
	}
	if err := provision.Save(cfg.StateDir, a); err != nil {
		return a, true, err
	}
	return a, true, nil
}
