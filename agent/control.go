package agent

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/gwagent/gwagent/agent/health"
	"github.com/gwagent/gwagent/agent/local"
	"github.com/gwagent/gwagent/agent/session"
	"github.com/gwagent/gwagent/firmware"
)

// startControl serves the local control socket (gwagent status, commit,
// rollback) until ctx is done. A socket that cannot be created is logged, not fatal:
// the agent's job does not depend on it.
func (a *Agent) startControl(ctx context.Context, wg *sync.WaitGroup) {
	path := local.Path(a.config().StateDir)
	srv, err := local.Listen(path, a.control, a.log.Named("control"))
	if err != nil {
		a.log.Warn("no local control socket: gwagent commit and rollback will not reach this agent", zap.Error(err))
		return
	}
	wg.Go(func() {
		if err := srv.Serve(ctx); err != nil {
			a.log.Warn("local control socket stopped", zap.Error(err))
		}
	})
}

// control answers a local control request. Ping and status only read.
// Commit and rollback are an operator's verdict on the running trial boot,
// handed to the health check the state machine is waiting on, so the state
// machine itself commits or rolls back and its record stays the only truth.
func (a *Agent) control(_ context.Context, req local.Request) local.Response {
	st := a.manager.Status()
	resp := local.Response{UpdateID: st.UpdateID, Phase: string(st.Phase)}
	switch req.Op {
	case local.OpPing:
		resp.OK = true
		return resp
	case local.OpStatus:
		resp.OK, resp.Hub, resp.Installer = true, hubState(a.session.Health(), time.Now()), a.installerType
		return resp
	case local.OpCommit, local.OpRollback:
	default:
		resp.Error = fmt.Sprintf("unknown operation %q (known: %s, %s, %s, %s)", req.Op, local.OpPing, local.OpStatus, local.OpCommit, local.OpRollback)
		return resp
	}
	if _, ok := a.installer.(firmware.Committer); !ok {
		resp.Error = fmt.Sprintf("the %s installer has no trial boot: there is nothing to %s (updates complete without one)", a.config().Installer.Type, req.Op)
		return resp
	}
	if !st.Busy || st.Phase != firmware.PhaseCommitting {
		if st.UpdateID == "" {
			resp.Error = fmt.Sprintf("no trial boot to %s: no update has run", req.Op)
		} else {
			resp.Error = fmt.Sprintf("no trial boot to %s: update %s is %s (only a trial boot, phase committing, waits for a verdict)", req.Op, st.UpdateID, st.Phase)
		}
		return resp
	}
	if a.health.Waiting() != st.UpdateID {
		// Still checking the boot itself, or the verdict was already given
		// and the state machine is acting on it.
		resp.Error = fmt.Sprintf("update %s is not waiting for a verdict right now (its health check is not running); see gwagent status and try again", st.UpdateID)
		return resp
	}
	commit := req.Op == local.OpCommit
	if err := a.health.Decide(health.Verdict{UpdateID: st.UpdateID, Commit: commit}); err != nil {
		if errors.Is(err, health.ErrPending) {
			resp.Error = "a verdict on this trial boot is already being applied"
		} else {
			resp.Error = err.Error()
		}
		return resp
	}
	resp.OK = true
	if commit {
		resp.Message = fmt.Sprintf("committing update %s: slot %s becomes the permanent one", st.UpdateID, st.Slot)
	} else {
		resp.Message = fmt.Sprintf("rolling back update %s: the previous slot boots next and the device reboots", st.UpdateID)
	}
	a.log.Info("operator verdict", zap.String("update_id", st.UpdateID), zap.String("op", req.Op))
	return resp
}

func hubState(h session.Health, now time.Time) *local.Hub {
	return &local.Hub{
		Connected: h.Connected, Host: h.Host, State: h.Describe(now),
		Since: h.Since, LastExchange: h.LastExchange, RetryAt: h.RetryAt, LastError: h.LastError,
		Connects: h.Connects, Drops: h.Drops,
	}
}

// FirmwareStateDir is where the agent keeps the firmware state machine's
// record under stateDir (read by gwagent status).
func FirmwareStateDir(stateDir string) string { return filepath.Join(stateDir, firmwareDir) }
