// Command goanchor is the Go SDK anchor of bench/scale.py (issue 19): N LiveKit
// participants in one process, with neither Matrix nor E2EE, each publishing a
// pre-encoded 320x240 VP8 stream at a fixed frame rate plus Opus, and each
// subscribed to every other participant's tracks (auto-subscribe), as a LiveKit
// load test does. Received video is counted, never decoded: a frame is an RTP
// packet with the marker bit set.
//
// It prints one JSON object on stdout: the per-pair frame counts over the
// measurement window, the lowest received/sent frame-rate ratio and this
// process's CPU (user+system) per participant over the same window.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/livekit/protocol/livekit"

	lksdk "github.com/livekit/server-sdk-go/v2"
	"github.com/pion/webrtc/v4"
	"github.com/pion/webrtc/v4/pkg/media"
	"github.com/pion/webrtc/v4/pkg/media/ivfreader"
)

// opusSilence is one 20 ms Opus packet (config 31, CELT FB 20 ms, one frame)
// carrying silence; enough for the SFU to forward an audio track.
var opusSilence = []byte{0xf8, 0xff, 0xfe}

type counters struct {
	mu     sync.Mutex
	frames map[[2]string]*atomic.Int64
}

func (c *counters) get(rx, tx string) *atomic.Int64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	k := [2]string{rx, tx}
	v, ok := c.frames[k]
	if !ok {
		v = new(atomic.Int64)
		c.frames[k] = v
	}
	return v
}

func (c *counters) snapshot() map[[2]string]int64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := make(map[[2]string]int64, len(c.frames))
	for k, v := range c.frames {
		out[k] = v.Load()
	}
	return out
}

func loadIVF(path string) ([][]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	r, _, err := ivfreader.NewWith(f)
	if err != nil {
		return nil, err
	}
	var frames [][]byte
	for {
		frame, _, err := r.ParseNextFrame()
		if err != nil {
			break
		}
		frames = append(frames, frame)
	}
	if len(frames) == 0 {
		return nil, fmt.Errorf("%s: no frames", path)
	}
	return frames, nil
}

func cpuSeconds() float64 {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return float64(ru.Utime.Nano()+ru.Stime.Nano()) / 1e9
}

type pair struct {
	Rx     string  `json:"rx"`
	Tx     string  `json:"tx"`
	Frames int64   `json:"frames"`
	FPS    float64 `json:"fps"`
}

type result struct {
	N                        int     `json:"n"`
	WindowS                  float64 `json:"window_s"`
	FPS                      int     `json:"fps"`
	MinFPSRatio              float64 `json:"min_fps_ratio"`
	CPUPercentPerParticipant float64 `json:"cpu_percent_per_participant"`
	Pairs                    []pair  `json:"pairs"`
	Joined                   int     `json:"joined"`
}

func main() {
	url := flag.String("url", "ws://127.0.0.1:7880", "LiveKit URL")
	key := flag.String("key", "devkey", "API key")
	secret := flag.String("secret", "secret", "API secret")
	room := flag.String("room", "goanchor", "room name")
	n := flag.Int("n", 3, "participants")
	ivf := flag.String("ivf", "", "VP8 IVF file, looped")
	fps := flag.Int("fps", 15, "video frame rate")
	warmup := flag.Duration("warmup", 5*time.Second, "time after the last join before measuring")
	window := flag.Duration("window", 10*time.Second, "measurement window")
	stagger := flag.Duration("stagger", 200*time.Millisecond, "delay between joins")
	flag.Parse()

	frames, err := loadIVF(*ivf)
	if err != nil {
		fmt.Fprintln(os.Stderr, "goanchor:", err)
		os.Exit(2)
	}
	// The project's LiveKit does not create rooms on join: create ours first.
	api := lksdk.NewRoomServiceClient(strings.Replace(*url, "ws", "http", 1), *key, *secret)
	if _, err := api.CreateRoom(context.Background(), &livekit.CreateRoomRequest{Name: *room}); err != nil {
		fmt.Fprintln(os.Stderr, "goanchor: create room:", err)
		os.Exit(2)
	}
	cnt := &counters{frames: map[[2]string]*atomic.Int64{}}
	stop := make(chan struct{})
	var rooms []*lksdk.Room
	var wg sync.WaitGroup

	for i := 0; i < *n; i++ {
		id := fmt.Sprintf("p%d", i)
		cb := lksdk.NewRoomCallback()
		cb.ParticipantCallback.OnTrackSubscribed = func(track *webrtc.TrackRemote, _ *lksdk.RemoteTrackPublication, rp *lksdk.RemoteParticipant) {
			if track.Kind() != webrtc.RTPCodecTypeVideo {
				go func() {
					for {
						if _, _, err := track.ReadRTP(); err != nil {
							return
						}
					}
				}()
				return
			}
			c := cnt.get(id, rp.Identity())
			go func() {
				for {
					pkt, _, err := track.ReadRTP()
					if err != nil {
						return
					}
					if pkt.Marker {
						c.Add(1)
					}
				}
			}()
		}
		r, err := lksdk.ConnectToRoom(*url, lksdk.ConnectInfo{
			APIKey: *key, APISecret: *secret, RoomName: *room, ParticipantIdentity: id,
		}, cb)
		if err != nil {
			fmt.Fprintln(os.Stderr, "goanchor: join", id, err)
			continue
		}
		rooms = append(rooms, r)
		video, err := lksdk.NewLocalSampleTrack(webrtc.RTPCodecCapability{MimeType: webrtc.MimeTypeVP8, ClockRate: 90000})
		if err != nil {
			fmt.Fprintln(os.Stderr, "goanchor:", err)
			os.Exit(2)
		}
		if _, err := r.LocalParticipant.PublishTrack(video, &lksdk.TrackPublicationOptions{
			Name: "video", VideoWidth: 320, VideoHeight: 240,
		}); err != nil {
			fmt.Fprintln(os.Stderr, "goanchor: publish video", id, err)
		}
		audio, err := lksdk.NewLocalSampleTrack(webrtc.RTPCodecCapability{MimeType: webrtc.MimeTypeOpus, ClockRate: 48000, Channels: 2})
		if err != nil {
			fmt.Fprintln(os.Stderr, "goanchor:", err)
			os.Exit(2)
		}
		if _, err := r.LocalParticipant.PublishTrack(audio, &lksdk.TrackPublicationOptions{Name: "audio"}); err != nil {
			fmt.Fprintln(os.Stderr, "goanchor: publish audio", id, err)
		}
		wg.Add(2)
		go func() {
			defer wg.Done()
			d := time.Second / time.Duration(*fps)
			t := time.NewTicker(d)
			defer t.Stop()
			for k := i; ; k++ {
				select {
				case <-stop:
					return
				case <-t.C:
					_ = video.WriteSample(media.Sample{Data: frames[k%len(frames)], Duration: d}, nil)
				}
			}
		}()
		go func() {
			defer wg.Done()
			t := time.NewTicker(20 * time.Millisecond)
			defer t.Stop()
			for {
				select {
				case <-stop:
					return
				case <-t.C:
					_ = audio.WriteSample(media.Sample{Data: opusSilence, Duration: 20 * time.Millisecond}, nil)
				}
			}
		}()
		time.Sleep(*stagger)
	}

	time.Sleep(*warmup)
	before, cpu0, t0 := cnt.snapshot(), cpuSeconds(), time.Now()
	time.Sleep(*window)
	after, cpu1, t1 := cnt.snapshot(), cpuSeconds(), time.Now()
	elapsed := t1.Sub(t0).Seconds()

	res := result{N: *n, WindowS: elapsed, FPS: *fps, Joined: len(rooms), MinFPSRatio: 1}
	res.CPUPercentPerParticipant = 100 * (cpu1 - cpu0) / elapsed / float64(*n)
	for i := 0; i < *n; i++ {
		for j := 0; j < *n; j++ {
			if i == j {
				continue
			}
			k := [2]string{fmt.Sprintf("p%d", i), fmt.Sprintf("p%d", j)}
			f := after[k] - before[k]
			p := pair{Rx: k[0], Tx: k[1], Frames: f, FPS: float64(f) / elapsed}
			res.Pairs = append(res.Pairs, p)
			if r := p.FPS / float64(*fps); r < res.MinFPSRatio {
				res.MinFPSRatio = r
			}
		}
	}
	close(stop)
	wg.Wait()
	for _, r := range rooms {
		r.Disconnect()
	}
	_ = json.NewEncoder(os.Stdout).Encode(res)
}
