export PYTHONUNBUFFERED=1
E="--config configs/enwik8.py --config.data.path=.gpu_data/enwik8_first_1MB.xml --config.data.batch_size=8 --steps 5 --warmup 2"
timeout 370 python3 scripts/bench_train.py $E --impls auto,cudnn_dense --config.model.scan_layers=False --config.model.remat=save_attention_dots --out $OUT/bt_sad_unrolled4.json > $OUT/bt_sad_unrolled4.log 2>&1; echo rc=$?
grep -v "^[WI][0-9]" $OUT/bt_sad_unrolled4.log | grep -E "compiled in|median|^pallas|^cudnn|rror" | cut -c1-150
