package hub

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/zap"

	"github.com/gwagent/gwagent/iothub"
)

func percentile(d []time.Duration, p float64) time.Duration {
	s := slices.Clone(d)
	slices.Sort(s)
	i := int(float64(len(s)-1) * p)
	return s[i]
}

// BenchmarkMethodRoundTrip measures a direct method through the hub (REST
// call → MQTT request to the device → device answer → REST answer) against
// a plain MQTT QoS 1 round trip (PUBLISH → PUBACK) on the same broker,
// interleaved in the same run so machine noise hits both alike. It reports
// p50/p99 of both and their ratio.
func BenchmarkMethodRoundTrip(b *testing.B) {
	h := startHub(b, func(c *Config) { c.Log = zap.NewNop() })
	key := addDevice(b, h, "bench")
	d := connect(b, h, "bench", key)
	d.answerMethods(200, `{"ok":true}`)
	svc := newService(b, h)
	body := []byte(`{"methodName":"ping","payload":{"n":1},"responseTimeoutInSeconds":30}`)
	telemetry := iothub.TelemetryTopic("bench")

	// Warm up connections and code paths.
	for range 20 {
		svc.do("POST", "/twins/bench/methods", body)
		d.pub(telemetry, 1, []byte(`{"n":1}`))
	}
	method := make([]time.Duration, 0, b.N)
	qos1 := make([]time.Duration, 0, b.N)
	b.ResetTimer()
	for range b.N {
		start := time.Now()
		st, rb, _ := svc.do("POST", "/twins/bench/methods", body)
		method = append(method, time.Since(start))
		if st != 200 {
			b.Fatalf("method: %d %s", st, rb)
		}
		start = time.Now()
		tok := d.c.Publish(telemetry, 1, false, []byte(`{"n":1}`))
		if !tok.WaitTimeout(waitLong) || tok.Error() != nil {
			b.Fatalf("QoS 1 publish: %v", tok.Error())
		}
		qos1 = append(qos1, time.Since(start))
	}
	b.StopTimer()
	mp50, mp99 := percentile(method, 0.50), percentile(method, 0.99)
	qp50, qp99 := percentile(qos1, 0.50), percentile(qos1, 0.99)
	b.ReportMetric(float64(mp50.Microseconds()), "method-p50-µs")
	b.ReportMetric(float64(mp99.Microseconds()), "method-p99-µs")
	b.ReportMetric(float64(qp50.Microseconds()), "qos1-p50-µs")
	b.ReportMetric(float64(qp99.Microseconds()), "qos1-p99-µs")
	b.ReportMetric(float64(mp50)/float64(qp50), "ratio-p50")
	b.ReportMetric(float64(mp99)/float64(qp99), "ratio-p99")
}

// BenchmarkConnectedDevices measures the resident memory of a gwhub process
// with N connected devices (HUB_BENCH_DEVICES, default 100; `make bench`
// uses 1000). The hub runs as its own process so the figure holds the hub
// alone, not the device clients.
func BenchmarkConnectedDevices(b *testing.B) {
	n := 100
	if v := os.Getenv("HUB_BENCH_DEVICES"); v != "" {
		var err error
		if n, err = strconv.Atoi(v); err != nil || n < 1 {
			b.Fatalf("HUB_BENCH_DEVICES=%q", v)
		}
	}
	bin := filepath.Join(b.TempDir(), "gwhub")
	if out, err := exec.Command("go", "build", "-o", bin, "github.com/gwagent/gwagent/cmd/gwhub").CombinedOutput(); err != nil {
		b.Fatalf("build gwhub: %v\n%s", err, out)
	}
	for range b.N {
		rss0, rssN := runConnected(b, bin, n)
		b.ReportMetric(float64(rss0)/1024, "idle-RSS-MB")
		b.ReportMetric(float64(rssN)/1024, "RSS-MB")
		b.ReportMetric(float64(rssN-rss0)/float64(n), "KB/device")
		b.ReportMetric(float64(n), "devices")
	}
}

// runConnected starts gwhub, registers and connects n devices, and returns
// the hub's RSS in KB before and after.
func runConnected(b *testing.B, bin string, n int) (int64, int64) {
	dir := b.TempDir()
	cmd := exec.Command(bin, "run", "--state-dir", dir, "--mqtt-addr", "127.0.0.1:0", "--https-addr", "127.0.0.1:0", "--log-level", "error")
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		b.Fatal(err)
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	defer func() {
		_ = cmd.Process.Signal(os.Interrupt)
		_ = cmd.Wait()
	}()
	mqttAddr, httpsAddr := readBanner(b, stdout)
	go func() { _, _ = io.Copy(io.Discard, stdout) }()

	// A Hub value over the same state directory gives the test the CA and
	// the service key; it never listens.
	view, err := New(Config{StateDir: dir, MQTTAddr: mqttAddr, HTTPSAddr: httpsAddr})
	if err != nil {
		b.Fatal(err)
	}
	svc := newService(b, view)
	keys := make([][]byte, n)
	for i := range n {
		id := fmt.Sprintf("dev-%04d", i)
		st, body, _ := svc.do("PUT", "/devices/"+id, `{}`)
		if st != 200 {
			b.Fatalf("create %s: %d %s", id, st, body)
		}
		var dv struct {
			Authentication iothub.Authentication `json:"authentication"`
		}
		if err := json.Unmarshal(body, &dv); err != nil {
			b.Fatal(err)
		}
		keys[i], _ = (iothub.ConnectionString{SharedAccessKey: dv.Authentication.SymmetricKey.PrimaryKey}).Key()
	}
	rss0 := vmRSS(b, cmd.Process.Pid)

	var wg sync.WaitGroup
	sem := make(chan struct{}, 32)
	for i := range n {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			id := fmt.Sprintf("dev-%04d", i)
			// dial and Error, not Fatal: this is not the benchmark's goroutine.
			d, code, err := dial(b, view, id, devOpts{password: sas(view, id, keys[i], time.Hour)})
			if err != nil {
				b.Errorf("connect %s: CONNACK %d: %v", id, code, err)
				return
			}
			tok := d.c.SubscribeMultiple(map[string]byte{iothub.MethodsFilter: 0, iothub.TwinResponseFilter: 0, iothub.DesiredFilter: 0}, nil)
			if !tok.WaitTimeout(waitLong) || tok.Error() != nil {
				b.Errorf("subscribe %s: %v", id, tok.Error())
			}
		}()
	}
	wg.Wait()
	if b.Failed() {
		b.FailNow()
	}
	return rss0, vmRSS(b, cmd.Process.Pid)
}

var listenRE = regexp.MustCompile(`listening on ([0-9.:\[\]]+)\)`)

// readBanner reads gwhub's start-up lines for the bound addresses.
func readBanner(b *testing.B, r io.Reader) (string, string) {
	sc := bufio.NewScanner(r)
	var addrs []string
	deadline := time.AfterFunc(waitLong, func() { b.Error("gwhub did not print its addresses") })
	defer deadline.Stop()
	for len(addrs) < 2 && sc.Scan() {
		if m := listenRE.FindStringSubmatch(sc.Text()); m != nil {
			addrs = append(addrs, m[1])
		}
	}
	if len(addrs) < 2 {
		b.Fatalf("gwhub banner without addresses (%v)", sc.Err())
	}
	return addrs[0], addrs[1]
}

func vmRSS(b *testing.B, pid int) int64 {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		b.Fatal(err)
	}
	for _, line := range strings.Split(string(data), "\n") {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			kb, err := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
			if err != nil {
				b.Fatal(err)
			}
			return kb
		}
	}
	b.Fatal("no VmRSS")
	return 0
}
