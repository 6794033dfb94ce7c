package vm

import (
	"context"
	"fmt"
	"strconv"
	"strings"
	"time"
)

// Bounds of the waits. Measured on a 2-core machine with software emulation:
// a boot to "gwagent running" takes 15-30 s, an update of a 300 MB image
// (download, write, read back) well under two minutes.
const (
	bootTimeout     = 4 * time.Minute
	downloadTimeout = 8 * time.Minute
	healthBound     = 4 * time.Minute // the images' update.healthTimeout is 60s
)

func final(s twinState) string {
	e := ""
	if s.fw.Error != nil {
		e = " (" + s.fw.Error.Code + ")"
	}
	return fmt.Sprintf("twin: %s%s, currentVersion %s, target slot %s", s.fw.Status, e, s.fw.CurrentVersion, s.fw.Slot)
}

// factoryBoot: the disk as it leaves the factory boots slot A; the agent
// starts under its hardened unit and connects.
func (g *gw) factoryBoot() string {
	m := g.mark()
	if _, err := g.m.start(); err != nil {
		g.t.Fatal(err)
	}
	g.waitBoot(m, "A", bootTimeout)
	g.waitAgent(m, bootTimeout)
	s := g.waitTwin(m, "the twin reporting the factory image's version 1.0.0", time.Minute, func(s twinState) bool {
		return s.fw.CurrentVersion == "1.0.0"
	})
	g.waitGuest(bootTimeout)
	g.checkSystem("rootA-1.0.0", "A")
	// The hardened unit as shipped: the drop-in adds mounts and an environment file only.
	out := g.guestOK("systemctl show gwagent -p ActiveState -p ProtectSystem -p DevicePolicy -p NoNewPrivileges -p CapabilityBoundingSet -p User")
	for _, want := range []string{"ActiveState=active", "ProtectSystem=strict", "DevicePolicy=closed", "NoNewPrivileges=yes"} {
		if !strings.Contains(out, want+"\n") {
			g.t.Errorf("gwagent.service: want %s, got:\n%s", want, out)
		}
	}
	g.logf("gwagent.service: %s", strings.Join(strings.Fields(out), " "))
	st := g.status()
	if !st.Agent.Running || st.Installer != "abpart" || st.RunningSlot != "A" || st.CommittedSlot != "A" || st.RunningVersion != "1.0.0" {
		g.t.Errorf("gwagent status: %+v", st)
	}
	return final(s)
}

// healthyUpdate: a signed image into slot B; the agent reboots into it on
// trial, the health check passes, and B is committed.
func (g *gw) healthyUpdate() string {
	m := g.mark()
	id, img := g.update("good-2.0.0.img.zst")
	g.expectStatus(m, id, "downloading", time.Minute)
	s := g.expectStatus(m, id, "rebooting", downloadTimeout)
	if s.fw.Slot != "B" {
		g.t.Errorf("twin: target slot %q, want B", s.fw.Slot)
	}
	g.waitBoot(m, "B", bootTimeout)
	s = g.expectStatus(m, id, "completed", bootTimeout+healthBound)
	if s.fw.CurrentVersion != img.version || s.fw.Slot != "B" || s.fw.Error != nil {
		g.t.Errorf("twin after the update: %s", s)
	}
	g.waitGuest(bootTimeout)
	g.checkSystem("good-2.0.0", "B")
	g.checkSequence("twin statuses", g.twinStatuses(m, id), []string{"downloading", "rebooting", "completed"})
	g.checkSequence("journal phases", g.phases(m, id), []string{"downloading", "verifying", "applying", "rebooting", "committing", "completed"})
	g.waitJournal(m, "journal: image signature verified", time.Second, func(e entry) bool {
		return e.agent() && e.says("image signature verified") && e.get("UPDATE_ID") == id
	})
	g.waitJournal(m, "journal: slot committed", time.Second, func(e entry) bool {
		return e.agent() && e.says("slot committed") && e.get("UPDATE_ID") == id
	})
	return final(s)
}

// refusedImages: images the device must not install are refused from their
// signed metadata before any byte of the image is fetched: the factory image
// (signed 1.0.0, older than the running 2.0.0) and an image signed for
// another device type. The inactive slot is not touched.
func (g *gw) refusedImages() string {
	before := g.slotHash("A")
	var s twinState
	for _, tc := range []struct{ image, sig, code, says string }{
		{"rootA-1.0.0.img", "rootA-1.0.0.img.minisig", "downgrade", "image 1.0.0 is older than running 2.0.0"},
		{"unhealthy-3.0.0.img.zst", "unhealthy-3.0.0.img.zst.other-board.minisig", "incompatible", "other-board"},
	} {
		m := g.mark()
		id, _ := g.updateSigned(tc.image, tc.sig)
		s = g.expectStatus(m, id, "failed", 2*time.Minute)
		if s.code() != tc.code || !strings.Contains(s.fw.Error.Message, tc.says) || s.fw.Bytes != 0 {
			g.t.Errorf("twin: want failed/%s naming %q with no byte downloaded, got %s (%d bytes)", tc.code, tc.says, s, s.fw.Bytes)
		}
		g.logf("%s refused: %s: %s", tc.image, s.code(), s.fw.Error.Message)
		g.notes = append(g.notes, fmt.Sprintf("update %.8s: %s: %s", id, s.code(), s.fw.Error.Message))
		g.waitJournal(m, "journal: update failed "+tc.code, 30*time.Second, func(e entry) bool {
			return e.agent() && e.says("update failed") && e.get("UPDATE_ID") == id && e.get("CODE") == tc.code
		})
	}
	if after := g.slotHash("A"); after != before {
		g.t.Errorf("the inactive slot A changed: %s before, %s after", before, after)
	}
	g.checkSystem("good-2.0.0", "B")
	return final(s)
}

// cancelDownload: an update cancelled with gwctl while it downloads ends
// failed/cancelled; the device keeps running and booting its slot, a second
// cancel finds nothing to cancel (409), and the next update (the power cut's)
// is accepted at once.
func (g *gw) cancelDownload() string {
	m := g.mark()
	id, _ := g.update("good-5.0.0.img")
	s := g.waitTwin(m, "download at 10% or more", downloadTimeout, func(s twinState) bool {
		return s.fw.UpdateID == id && (s.fw.Terminal() || s.fw.Status != "downloading" && s.fw.Status != "standBy" || s.fw.Percent >= 10)
	})
	if s.fw.Status != "downloading" {
		g.t.Fatalf("the download was over before the cancel: %s", s)
	}
	out, err := g.hub.gwctl(g.ctx, "update", "cancel", deviceID, "--update-id", id)
	if err != nil || !strings.Contains(out, "cancelled") {
		g.t.Fatalf("gwctl update cancel at %d%%: %v\n%s", s.fw.Percent, err, out)
	}
	g.logf("gwctl update cancel at %d%%: %s", s.fw.Percent, strings.TrimSpace(out))
	s = g.expectStatus(m, id, "failed", time.Minute)
	if s.code() != "cancelled" {
		g.t.Errorf("twin: want failed/cancelled, got %s", s)
	}
	g.waitJournal(m, "journal: update cancelled", 30*time.Second, func(e entry) bool {
		return e.agent() && e.says("update cancelled") && e.get("UPDATE_ID") == id
	})
	out, err = g.hub.gwctl(g.ctx, "update", "cancel", deviceID, "--update-id", id)
	if err == nil || !strings.Contains(err.Error(), "409") {
		g.t.Errorf("a second cancel: want 409, got %v\n%s", err, out)
	}
	g.checkSystem("good-2.0.0", "B")
	return final(s)
}

// slotHash is the SHA-256 of the first 64 MiB of a slot, read in the guest
// (an update writes the slot from its first byte).
func (g *gw) slotHash(slot string) string {
	g.t.Helper()
	out := strings.Fields(g.guestOK("head -c 67108864 /dev/disk/by-partlabel/root" + slot + " | sha256sum"))
	if len(out) == 0 {
		g.t.Fatalf("no hash of slot %s", slot)
	}
	return out[0]
}

// unhealthyImage: an image whose application fails (its gw-app.service, in
// update.healthUnits) boots on trial, is never healthy, and is rolled back.
func (g *gw) unhealthyImage() string {
	m := g.mark()
	id, _ := g.update("unhealthy-3.0.0.img.zst")
	s := g.expectStatus(m, id, "rebooting", downloadTimeout)
	if s.fw.Slot != "A" {
		g.t.Errorf("twin: target slot %q, want A", s.fw.Slot)
	}
	g.waitBoot(m, "A", bootTimeout)
	g.expectStatus(m, id, "committing", bootTimeout)
	g.waitGuest(bootTimeout)
	out := g.guest("cat /etc/gw-image; systemctl is-active gw-app.service")
	g.logf("trial boot: %s", strings.Join(strings.Fields(out.out), " "))
	if f := strings.Fields(out.out); len(f) != 3 || f[0] != "unhealthy-3.0.0" || f[2] == "active" {
		g.t.Errorf("the trial boot: %q, want unhealthy-3.0.0 with gw-app.service not active", out.out)
	}
	afterTrial := g.mark()
	s = g.expectStatus(m, id, "rolledBack", healthBound)
	if s.code() != "healthCheckFailed" || !strings.Contains(s.fw.Error.Message, "gw-app.service") {
		g.t.Errorf("twin: want healthCheckFailed naming gw-app.service, got %s", s)
	}
	g.waitBoot(afterTrial, "B", bootTimeout)
	s = g.waitAgent(afterTrial, bootTimeout)
	if s.fw.CurrentVersion != "2.0.0" {
		g.t.Errorf("twin after the rollback: currentVersion %q, want 2.0.0", s.fw.CurrentVersion)
	}
	g.waitGuest(bootTimeout)
	g.checkSystem("good-2.0.0", "B")
	// rollingBack is on the twin for the whole reboot back to B.
	g.checkSequence("twin statuses", g.twinStatuses(m, id), []string{"rebooting", "committing", "rollingBack", "rolledBack"})
	g.checkSequence("journal phases", g.phases(m, id), []string{"downloading", "verifying", "applying", "rebooting", "committing", "rollingBack"})
	g.waitJournal(m, "journal: gw-app failed on the trial boot", time.Second, func(e entry) bool {
		return e.fields["_SYSTEMD_UNIT"] == "gw-app.service" && strings.Contains(e.msg(), "does not start")
	})
	g.waitJournal(m, "journal: update rolled back", time.Second, func(e entry) bool {
		return e.agent() && strings.Contains(e.msg(), "rolled back")
	})
	return final(g.twinNow())
}

// badKernel: an image whose kernel GRUB cannot load. Each trial boot fails
// in GRUB (the snippet's second entry restarts); after bootlimit of them
// GRUB falls back to B, and the agent reports the bootloader's rollback.
func (g *gw) badKernel() string {
	m := g.mark()
	id, _ := g.update("badkernel-4.0.0.img.zst")
	g.expectStatus(m, id, "rebooting", downloadTimeout)
	fallback := g.waitConsole(m, "GRUB falling back", bootTimeout, func(l consoleLine) bool {
		return strings.HasPrefix(l.text, "gwagent: slot A failed") && strings.Contains(l.text, "falling back")
	})
	failures := 0
	for _, l := range g.m.console.since(m.console) {
		if strings.HasPrefix(l.text, "gwagent: cannot load slot A; restarting") {
			failures++
		}
	}
	limit := strings.Fields(strings.TrimPrefix(fallback.text, "gwagent: slot A failed "))[0]
	if strconv.Itoa(failures) != limit || limit != "3" {
		g.t.Errorf("GRUB could not load slot A %d times, then said %q; want 3 (the snippet's bootlimit)", failures, fallback.text)
	}
	g.waitBoot(m, "B", bootTimeout)
	s := g.expectStatus(m, id, "failed", bootTimeout)
	if s.code() != "rolledBackByBootloader" || s.fw.CurrentVersion != "2.0.0" {
		g.t.Errorf("twin: want failed/rolledBackByBootloader with 2.0.0 running, got %s", s)
	}
	g.waitGuest(bootTimeout)
	g.checkSystem("good-2.0.0", "B")
	g.checkSequence("twin statuses", g.twinStatuses(m, id), []string{"rebooting", "failed"})
	g.checkSequence("journal phases", g.phases(m, id), []string{"downloading", "verifying", "applying", "rebooting", "committing"})
	g.waitJournal(m, "journal: the bootloader's fallback seen on slot B", time.Second, func(e entry) bool {
		return e.agent() && e.get("UPDATE_ID") == id && e.get("CODE") == "rolledBackByBootloader"
	})
	return final(s)
}

// powerCut: QEMU is killed while the image streams into slot A; the disk
// boots B again, the agent resumes the download from its checkpoint (an HTTP
// Range request, not from zero) and the update completes.
func (g *gw) powerCut() string {
	m := g.mark()
	id, img := g.update("good-5.0.0.img")
	s := g.waitTwin(m, "download at 30% or more", downloadTimeout, func(s twinState) bool {
		return s.fw.UpdateID == id && (s.fw.Terminal() || s.fw.Status != "downloading" && s.fw.Status != "standBy" || s.fw.Percent >= 30)
	})
	if s.fw.Status != "downloading" {
		g.t.Fatalf("the download was over before the power cut: %s", s)
	}
	g.logf("power cut (SIGKILL to QEMU) at %d%% of %d MiB", s.fw.Percent, img.size>>20)
	g.m.cur.kill()
	afterCut := g.mark()
	if _, err := g.m.start(); err != nil {
		g.t.Fatal(err)
	}
	g.waitBoot(afterCut, "B", bootTimeout)
	afterB := g.mark()
	resumed := g.waitJournal(afterCut, "journal: resuming download", bootTimeout, func(e entry) bool {
		return e.agent() && e.says("resuming download")
	})
	from, _ := strconv.ParseInt(resumed.get("BYTES"), 10, 64)
	if from <= 0 || from >= img.size {
		g.t.Errorf("the download resumed at byte %d of %d", from, img.size)
	}
	g.logf("resumed at byte %d of %d (%d%%)", from, img.size, from*100/img.size)
	g.expectStatus(afterCut, id, "rebooting", downloadTimeout)
	g.waitBoot(afterB, "A", bootTimeout)
	s = g.expectStatus(afterCut, id, "completed", bootTimeout+healthBound)
	if s.fw.CurrentVersion != img.version || s.fw.Slot != "A" {
		g.t.Errorf("twin after the update: %s", s)
	}
	g.waitGuest(bootTimeout)
	g.checkSystem("good-5.0.0", "A")
	g.checkSequence("twin statuses", g.twinStatuses(m, id), []string{"downloading", "rebooting", "completed"})
	g.checkSequence("journal phases", g.phases(m, id), []string{"downloading", "rebooting", "committing", "completed"})
	return final(s)
}

const holdFlag = "/data/site/hold-health"

// localCommit: a trial boot whose health check waits (the application holds
// it) is committed on the device with `gwagent commit`.
func (g *gw) localCommit() string {
	g.guestOK("touch " + holdFlag)
	m := g.mark()
	id, img := g.update("good-6.0.0.img.zst")
	g.expectStatus(m, id, "rebooting", downloadTimeout)
	g.waitBoot(m, "B", bootTimeout)
	g.expectStatus(m, id, "committing", bootTimeout)
	g.waitGuest(bootTimeout)
	st := g.status()
	g.logf("gwagent status: running %s %s, committed %s, trial %s, update %.8s %s",
		st.RunningSlot, st.RunningVersion, st.CommittedSlot, st.TrialSlot, st.Update.ID, st.Update.Phase)
	if st.RunningSlot != "B" || st.CommittedSlot != "A" || st.TrialSlot != "B" || st.Update.ID != id || st.Update.Phase != "committing" {
		g.t.Fatalf("gwagent status on the trial boot: %+v", st)
	}
	if out := g.guestOK("systemctl is-active gw-app.service || true"); strings.TrimSpace(out) != "activating" {
		g.t.Errorf("gw-app.service is %q on the held trial boot, want activating", strings.TrimSpace(out))
	}
	r := g.guest("gwagent commit")
	g.logf("gwagent commit: exit %d: %s", r.code, strings.TrimSpace(r.out+r.err))
	if r.code != 0 || !strings.Contains(r.out, "completed") {
		g.t.Errorf("gwagent commit: exit %d\n%s%s", r.code, r.out, r.err)
	}
	g.guestOK("rm -f " + holdFlag)
	s := g.expectStatus(m, id, "completed", time.Minute)
	if s.fw.CurrentVersion != img.version || s.fw.Slot != "B" {
		g.t.Errorf("twin after the commit: %s", s)
	}
	g.checkSystem("good-6.0.0", "B")
	g.waitJournal(m, "journal: operator verdict commit", time.Second, func(e entry) bool {
		return e.agent() && e.says("operator verdict") && e.get("OP") == "commit"
	})
	return final(s)
}

// localRollback: a held trial boot is rolled back with `gwagent rollback`;
// the agent reboots into the previous slot.
func (g *gw) localRollback() string {
	g.guestOK("touch " + holdFlag)
	m := g.mark()
	id, _ := g.update("good-7.0.0.img.zst")
	g.expectStatus(m, id, "rebooting", downloadTimeout)
	g.waitBoot(m, "A", bootTimeout)
	g.expectStatus(m, id, "committing", bootTimeout)
	g.waitGuest(bootTimeout)
	st := g.status()
	if st.RunningSlot != "A" || st.CommittedSlot != "B" || st.TrialSlot != "A" || st.Update.Phase != "committing" {
		g.t.Fatalf("gwagent status on the trial boot: %+v", st)
	}
	afterVerdict := g.mark()
	r := g.guest("gwagent rollback")
	g.logf("gwagent rollback: exit %d: %s", r.code, strings.TrimSpace(r.out+r.err))
	// The rollback ends on the previous slot: until the reboot it is
	// rollingBack.
	if r.code != 0 || !strings.Contains(r.out, "rollingBack") {
		g.t.Errorf("gwagent rollback: exit %d\n%s%s", r.code, r.out, r.err)
	}
	s := g.expectStatus(m, id, "rolledBack", bootTimeout)
	if s.code() != "healthCheckFailed" || !strings.Contains(s.fw.Error.Message, "operator") {
		g.t.Errorf("twin: want healthCheckFailed by the operator, got %s", s)
	}
	g.waitBoot(afterVerdict, "B", bootTimeout)
	g.waitAgent(afterVerdict, bootTimeout)
	g.waitGuest(bootTimeout)
	g.guestOK("rm -f " + holdFlag)
	g.checkSystem("good-6.0.0", "B")
	st = g.status()
	if st.RunningSlot != "B" || st.CommittedSlot != "B" || st.TrialSlot != "" || st.RunningVersion != "6.0.0" {
		g.t.Errorf("gwagent status after the rollback: %+v", st)
	}
	g.checkSequence("twin statuses", g.twinStatuses(m, id), []string{"rebooting", "committing", "rollingBack", "rolledBack"})
	g.waitJournal(m, "journal: operator verdict rollback", time.Second, func(e entry) bool {
		return e.agent() && e.says("operator verdict") && e.get("OP") == "rollback"
	})
	return final(g.twinNow())
}

// powerOff: the guest powers off cleanly and QEMU ends.
func (g *gw) powerOff() string {
	// From a timer: a poweroff run by the guest agent itself can take the
	// agent down before it has returned the command's status.
	g.guestOK("systemd-run --on-active=1 systemctl poweroff")
	q := g.m.cur
	waitLogged(g, "QEMU to exit after poweroff", 2*time.Minute, func(ctx context.Context) (struct{}, error) {
		return struct{}{}, q.waitExit(ctx)
	}, func() string { return "QEMU still running" })
	return final(g.twinNow())
}

func (g *gw) twinNow() twinState {
	h := g.twin.since(0)
	if len(h) == 0 {
		return twinState{}
	}
	return h[len(h)-1]
}
