package agent

import (
	"reflect"

	"go.uber.org/zap"

	"github.com/gwagent/gwagent/agent/config"
)

// Reload applies a new configuration to the running agent (SIGHUP). It
// applies what can change live — log.level (unless the logLevel desired
// property overrides it) and report.* — and returns the keys that changed
// but need a restart.
func (a *Agent) Reload(next *config.Config) (applied, needRestart []string) {
	a.mu.Lock()
	prev := a.cfg
	merged := *prev
	if next.Log.Level != prev.Log.Level {
		merged.Log.Level = next.Log.Level
		applied = append(applied, "log.level")
	}
	if next.Report != prev.Report {
		merged.Report = next.Report
		applied = append(applied, "report")
	}
	a.cfg = &merged
	a.mu.Unlock()

	if contains(applied, "log.level") && !a.acker.Overridden("logLevel") {
		if l, err := parseLevel(next.Log.Level); err == nil {
			a.level.SetLevel(l)
		}
	}
	if contains(applied, "report") {
		a.reporter.SetLimits(next.Report.MinInterval, next.Report.MinPercentStep)
	}

	diff := func(key string, x, y any) {
		if !reflect.DeepEqual(x, y) {
			needRestart = append(needRestart, key)
		}
	}
	diff("hub.connectionString", prev.Hub.ConnectionString, next.Hub.ConnectionString)
	diff("hub.address", prev.Hub.Address, next.Hub.Address)
	diff("hub.caFile", prev.Hub.CAFile, next.Hub.CAFile)
	diff("hub.x509", prev.Hub.X509, next.Hub.X509)
	diff("hub.keepAlive", prev.Hub.KeepAlive, next.Hub.KeepAlive)
	diff("hub.sasTTL", prev.Hub.SASTTL, next.Hub.SASTTL)
	diff("hub.connectTimeout", prev.Hub.ConnectTimeout, next.Hub.ConnectTimeout)
	diff("hub.requestTimeout", prev.Hub.RequestTimeout, next.Hub.RequestTimeout)
	diff("hub.minRetryDelay", prev.Hub.MinRetryDelay, next.Hub.MinRetryDelay)
	diff("hub.maxRetryDelay", prev.Hub.MaxRetryDelay, next.Hub.MaxRetryDelay)
	diff("stateDir", prev.StateDir, next.StateDir)
	diff("currentVersion", prev.CurrentVersion, next.CurrentVersion)
	diff("device", prev.Device, next.Device)
	diff("installer", prev.Installer, next.Installer)
	diff("update", prev.Update, next.Update)
	diff("signature", prev.Signature, next.Signature)
	diff("log.format", prev.Log.Format, next.Log.Format)
	diff("shutdownTimeout", prev.ShutdownTimeout, next.ShutdownTimeout)
	a.log.Info("configuration reloaded", zap.Strings("applied", applied), zap.Strings("need_restart", needRestart))
	return applied, needRestart
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}
